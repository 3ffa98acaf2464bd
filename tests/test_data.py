"""Degradations (pure functions), dataset layouts and their errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from moceir.data.datasets import (BenchmarkDataset, DatasetLayoutError, PairedPatchDataset, benchmark_pairs,
                                  build_train_pairs, pair_by_name, train_pairs)
from moceir.data.degradations import (add_gaussian_noise, add_haze, augment, crop_to_multiple, pseudo_depth,
                                      random_haze, seeded_rng, sigma_for_task)


def test_sigma_is_chosen_by_task_name_not_position():
    assert [sigma_for_task(t) for t in ("denoise_50", "denoise_15", "denoise_25")] == [50, 15, 25]
    with pytest.raises(ValueError, match="denoise_15"):
        sigma_for_task("derain")


def test_gaussian_noise_matches_upstream_formula():
    clean = np.full((64, 64, 3), 128, np.uint8)
    noisy = add_gaussian_noise(clean, 25, np.random.default_rng(0))
    expected = np.clip(128 + np.random.default_rng(0).standard_normal(clean.shape) * 25, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(noisy, expected)
    assert abs((noisy.astype(float) - 128).std() - 25) < 1.0


def test_evaluation_noise_depends_only_on_name_and_sigma():
    a = seeded_rng("0001.png", 25).standard_normal(4)
    seeded_rng("other.png", 50).standard_normal(100)  # another benchmark ran in between
    b = seeded_rng("0001.png", 25).standard_normal(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, seeded_rng("0001.png", 15).standard_normal(4))


def test_haze_model_on_tiny_input():
    clean = np.zeros((2, 2, 3), np.float32)
    depth = np.array([[0.0, 1.0], [0.5, 2.0]], np.float32)
    hazy = add_haze(clean, depth, beta=1.0, airlight=0.9)
    np.testing.assert_allclose(hazy[..., 0], 0.9 * (1 - np.exp(-depth)), rtol=1e-6)
    d = pseudo_depth(16, 24, np.random.default_rng(0))
    assert d.shape == (16, 24) and d.min() >= 0 and d.max() <= 1 and d[0].mean() > d[-1].mean()
    out = random_haze(np.full((16, 16, 3), 10, np.uint8), np.random.default_rng(1))
    assert out.dtype == np.uint8 and out.mean() > 10  # haze brightens a dark image


def test_augment_modes_are_the_8_dihedral_transforms():
    img = np.arange(2 * 3 * 1).reshape(2, 3, 1)
    outs = {augment(img, m).tobytes() + bytes(augment(img, m).shape) for m in range(8)}
    assert len(outs) == 8
    np.testing.assert_array_equal(augment(img, 0), img)
    np.testing.assert_array_equal(augment(img, 1), np.flipud(img))
    with pytest.raises(ValueError):
        augment(img, 8)


def test_crop_to_multiple_is_centred():
    img = np.arange(35 * 20).reshape(35, 20)
    out = crop_to_multiple(img, 16)
    assert out.shape == (32, 16)
    np.testing.assert_array_equal(out, img[1:33, 2:18])


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_pairs_are_matched_by_name_not_sorted_order(tiny_layout):
    pairs = train_pairs(tiny_layout, "derain")
    assert {(p.degraded.stem, p.clean.stem) for p in pairs} == {("rain-1", "norain-1"), ("rain-2", "norain-2"),
                                                                  ("rain-10", "norain-10")}
    assert all(p.degraded.stem.split("-")[1] == p.clean.stem.split("-")[1] for p in pairs)


def test_unmatched_file_is_an_error(tiny_layout):
    _write(tiny_layout / "deraining/RainTrainL/rainy/rain-99.png", np.zeros((40, 48, 3), np.uint8))
    with pytest.raises(DatasetLayoutError, match="rain-99"):
        train_pairs(tiny_layout, "derain")


@pytest.mark.parametrize("task,expected", [
    ("deblur", "deblurring/GoPro/crop/train/input_crops"),
    ("synllie", "llie/LOLv1/Train/input"),
    ("dehaze", "dehazing/RESIDE"),
])
def test_missing_task_folder_names_the_exact_path(tmp_path, task, expected):
    with pytest.raises(DatasetLayoutError, match=expected):
        build_train_pairs(tmp_path, [task])


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "denoising/BSD400").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no images"):
        build_train_pairs(tmp_path, ["denoise_25"])


def test_unknown_task_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="denoise_15"):
        build_train_pairs(tmp_path, ["denoise_99"])


def test_identity_task_pairs_clean_patches_with_themselves(tiny_layout):
    sets = build_train_pairs(tiny_layout, ["denoise_15", "identity"], repeats={"identity": 2})
    assert len(sets["identity"]) == 2 * len(sets["denoise_15"]) // 3  # BSD400 repeated 2x vs denoise's 3x
    ds = PairedPatchDataset(sets["identity"], patch_size=32)
    item = ds[0]
    assert item["task"] == "identity" and torch.equal(item["lq"], item["gt"])
    noisy = PairedPatchDataset(sets["denoise_15"], patch_size=32)[0]
    assert not torch.equal(noisy["lq"], noisy["gt"])
    assert len(build_train_pairs(tiny_layout, ["identity"])["identity"]) == len(sets["denoise_15"])  # x3 default
    with pytest.raises(DatasetLayoutError, match="repeated 0 times"):
        build_train_pairs(tiny_layout, ["identity"], repeats={"identity": 0})
    assert build_train_pairs(tiny_layout, ["derain", "identity"], repeats={"identity": 0})["identity"] == []


def test_repeat_factors_and_synthetic_haze(tiny_layout):
    sets = build_train_pairs(tiny_layout, ["denoise_15", "derain", "dehaze"], dehaze_source="synthetic",
                             repeats={"derain": 2})
    assert {k: len(v) for k, v in sets.items()} == {"denoise_15": 9, "derain": 6, "dehaze": 9}
    ds = PairedPatchDataset([p for v in sets.values() for p in v], patch_size=32)
    for i in (0, 9, 20):
        item = ds[i]
        assert item["lq"].shape == item["gt"].shape == (3, 32, 32)
        assert 0 <= item["lq"].min() and item["lq"].max() <= 1
        assert not (item["lq"] == item["gt"]).all()


def test_holdout_keeps_validation_split_out(tiny_layout):
    train = train_pairs(tiny_layout, "derain", holdout=True)
    val = benchmark_pairs(tiny_layout, "raintrainl_val")
    assert [p.clean.stem for p in val] == ["norain-10"]
    assert "norain-10" not in {p.clean.stem for p in train}


def test_benchmark_dataset_crops_and_seeds_noise(tiny_layout):
    ds = BenchmarkDataset(benchmark_pairs(tiny_layout, "denoise_25"))
    a, b = ds[0], ds[0]
    assert a["lq"].shape == (3, 32, 48)  # 40x48 centre-cropped to multiples of 16
    assert (a["lq"] == b["lq"]).all()


def test_pair_by_name_custom_key(tmp_path):
    d = [tmp_path / "0001_0.8_0.2.jpg"]
    c = [tmp_path / "0001.png", tmp_path / "0002.png"]
    pairs = pair_by_name(d, c, "dehaze", lambda s: s.split("_")[0])
    assert pairs[0].clean.name == "0001.png"


def test_shared_datasets_layout(datasets_dir):
    assert len(benchmark_pairs(datasets_dir, "denoise_15")) == 68
    assert len(benchmark_pairs(datasets_dir, "dehaze")) == 7
    assert len(benchmark_pairs(datasets_dir, "lolv1")) == 15
    assert len(train_pairs(datasets_dir, "derain")) == 200
    item = PairedPatchDataset(train_pairs(datasets_dir, "derain")[:2], patch_size=64)[1]
    assert item["lq"].shape == (3, 64, 64)


def test_cdd11_subsets(tmp_path):
    from moceir.data.datasets import cdd11_pairs

    img = np.zeros((20, 20, 3), np.uint8)
    for folder in ("clear", "haze", "low", "haze_rain", "low_haze_rain"):
        _write(tmp_path / "cdd11/train" / folder / "a.png", img)
    names = lambda subset: sorted({p.task for p in cdd11_pairs(tmp_path, "train", subset)})
    assert names("single") == ["cdd11:haze", "cdd11:low"]
    assert names("double") == ["cdd11:haze_rain"]
    assert names("triple") == ["cdd11:low_haze_rain"]
    assert len(names("all")) == 4 and names("haze_rain") == ["cdd11:haze_rain"]
    sets = build_train_pairs(tmp_path, [], trainset="CDD11_single")
    assert len(sets["cdd11"]) == 4  # 2 folders x 1 image x repeat 2
    with pytest.raises(DatasetLayoutError, match="cdd11/test"):
        cdd11_pairs(tmp_path, "test", "all")


def test_scored_benchmark_refuses_a_benchmark_with_nothing_scored(tiny_layout):
    import torch

    import moceir
    from moceir.evaluation import scored_benchmark

    model = moceir.create_model("MoCE_IR_tiny").eval()
    assert len(scored_benchmark(model, tiny_layout, "dehaze", torch.device("cpu"), progress=False).rows) == 3
    for hazy in (tiny_layout / "dehazing/SOTS/outdoor/hazy").iterdir():  # every pair's sizes now differ
        Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(hazy)
    with pytest.raises(DatasetLayoutError, match=r"dehaze: no image of .* could be scored \(first: "):
        scored_benchmark(model, tiny_layout, "dehaze", torch.device("cpu"), progress=False)


def _u8(t: torch.Tensor) -> np.ndarray:
    return (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_benchmark_noise_is_seeded_by_each_images_name_and_sigma(tmp_path):
    """Mutation audit: noise seeded by sigma alone, or BenchmarkDataset seeding every image alike, passed. Two
    images with the same pixels but different names get different noise, each add_gaussian_noise(seeded_rng(name,
    sigma))."""
    from moceir.data.datasets import BenchmarkDataset, benchmark_pairs
    from moceir.data.degradations import add_gaussian_noise, seeded_rng

    img = np.random.default_rng(0).integers(60, 200, (32, 48, 3), dtype=np.uint8)
    for name in ("0001.png", "0002.png"):
        _write(tmp_path / "denoising/cBSD68/original_png" / name, img)
    ds = BenchmarkDataset(benchmark_pairs(tmp_path, "denoise_25"))
    a, b = ds[0], ds[1]
    assert torch.equal(a["gt"], b["gt"]) and not torch.equal(a["lq"], b["lq"])
    for item in (a, b):
        np.testing.assert_array_equal(_u8(item["lq"]), add_gaussian_noise(img, 25, seeded_rng(item["name"], 25)))
    assert not np.array_equal(seeded_rng("0001.png", 25).standard_normal(8),
                              seeded_rng("0002.png", 25).standard_normal(8))


def test_training_patches_share_their_crop_and_augmentation(tmp_path):
    """Mutation audit: a degraded patch cut at its own offset, or flipped while its clean patch was not, passed.
    A pair whose degraded file holds the clean pixels gives lq == gt for every random patch."""
    from moceir.data.datasets import PairedPatchDataset, train_pairs

    img = np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    _write(tmp_path / "deraining/RainTrainL/rainy/rain-1.png", img)
    _write(tmp_path / "deraining/RainTrainL/gt/norain-1.png", img)
    ds = PairedPatchDataset(train_pairs(tmp_path, "derain"), patch_size=16)
    torch.manual_seed(0)
    for _ in range(16):
        item = ds[0]
        assert torch.equal(item["lq"], item["gt"])


def test_reside_training_pairs_are_matched_by_image_number(tmp_path):
    """Mutation audit: RESIDE OTS training pairs NNNN_A_beta.jpg with clear/NNNN.jpg (no test built a RESIDE layout)."""
    from moceir.data.datasets import train_pairs

    img = np.zeros((32, 32, 3), np.uint8)
    for part, hazy in (("part1", "0001_0.8_0.2.jpg"), ("part2", "0002_1_0.16.jpg"), ("part2", "0001_0.9_0.08.jpg")):
        _write(tmp_path / "dehazing/RESIDE" / part / hazy, img)
    for clear in ("0001.jpg", "0002.jpg"):
        _write(tmp_path / "dehazing/RESIDE/clear" / clear, img)
    pairs = train_pairs(tmp_path, "dehaze")
    assert sorted((p.degraded.name, p.clean.name) for p in pairs) == [
        ("0001_0.8_0.2.jpg", "0001.jpg"), ("0001_0.9_0.08.jpg", "0001.jpg"), ("0002_1_0.16.jpg", "0002.jpg")]


def test_holdout_val_reaches_the_training_loader(tiny_layout):
    """Mutation audit: the loader's derain pairs leave out RainTrainL ids % 10 == 0 with holdout_val (the dataset
    function was tested, the setting's path to it was not)."""
    from moceir.training import TrainSettings, build_dataloader

    def derain(holdout):
        s = TrainSettings(de_type=("derain",), data_file_dir=str(tiny_layout), batch_size=1, patch_size=16,
                          num_workers=0, holdout_val=holdout, repeats={"derain": 1})
        return sorted(p.clean.stem for p in build_dataloader(s, 1)[1]["derain"])

    assert derain(False) == ["norain-1", "norain-10", "norain-2"]
    assert derain(True) == ["norain-1", "norain-2"]


def test_a_dataset_folder_that_is_a_link_loop_or_a_file_is_called_so(tmp_path):
    """Probe (2026-12-07): a benchmark folder that was a link loop was reported as a "missing folder"."""
    from moceir.data.datasets import DatasetLayoutError, images_in

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file").write_text("x")
    for name, says in (("loop", "loop is a link loop, not a folder"), ("file", "file is a file, not a folder"),
                       ("none", "missing folder")):
        with pytest.raises(DatasetLayoutError, match=says):
            images_in(tmp_path / name, "layout")


def test_a_cdd11_training_folder_with_two_files_of_one_name_is_refused(tmp_path):
    """Probe: haze/001.png and haze/001.jpg were both trained on (the standard layout refuses the same)."""
    img = np.zeros((20, 20, 3), np.uint8)
    for rel in ("clear/001.png", "haze/001.png", "haze/001.jpg"):
        _write(tmp_path / "cdd11/train" / rel, img)
    with pytest.raises(DatasetLayoutError, match=r"haze/001.jpg and 001.png share the name '001'"):
        build_train_pairs(tmp_path, [], trainset="CDD11_single")


def test_a_link_to_a_benchmark_image_beside_it_is_refused(tiny_layout):
    """Probe: cBSD68 with zz_link.png -> 0001.png beside it scored 0001 twice, which moved the mean PSNR (21.36 dB
    against 21.43 for the real images); `restore` restores such a file once."""
    import os

    folder = tiny_layout / "denoising/cBSD68/original_png"
    os.symlink("0001.png", folder / "zz_link.png")
    os.symlink(tiny_layout / "denoising/BSD400/1.jpg", folder / "zz_elsewhere.png")  # another folder's: counted
    with pytest.raises(DatasetLayoutError, match=r"zz_link.png and 0001.png in .* are the same image .*counted twice"):
        benchmark_pairs(tiny_layout, "denoise_15")
    (folder / "zz_link.png").unlink()
    assert len(benchmark_pairs(tiny_layout, "denoise_15")) == 4


def test_two_names_for_one_image_are_refused_whatever_the_link(tiny_layout):
    """Review: two links to one outside file (and hard links) count an image twice as well."""
    import os

    folder = tiny_layout / "denoising/cBSD68/original_png"
    outside = tiny_layout / "denoising/BSD400/1.jpg"
    os.symlink(outside, folder / "zz_a.png")
    os.symlink(outside, folder / "zz_b.png")
    with pytest.raises(DatasetLayoutError, match=r"zz_b.png and zz_a.png in .* are the same image"):
        benchmark_pairs(tiny_layout, "denoise_15")
    (folder / "zz_b.png").unlink()
    os.link(folder / "0001.png", folder / "zz_hard.png")
    with pytest.raises(DatasetLayoutError, match=r"zz_hard.png and 0001.png in .* are the same image"):
        benchmark_pairs(tiny_layout, "denoise_15")


def test_a_benchmark_where_nothing_pairs_is_one_layout_error(tiny_layout):
    """Review: a LOLv1 copy named low*/normal* gave one 'no counterpart' line per file (30), not the layout error."""
    folder = tiny_layout / "llie/LOLv1/Test/input"
    for p in sorted(folder.iterdir()):
        p.rename(folder / f"low{p.name}")
    unmatched = []
    with pytest.raises(DatasetLayoutError, match=r"3 file\(s\) in .*input have no clean counterpart"):
        benchmark_pairs(tiny_layout, "lolv1", unmatched=unmatched)


def test_cdd11_leaves_out_hidden_folders_and_scores_past_an_empty_one(tmp_path):
    """Probe: .ipynb_checkpoints/ under cdd11/test was scored as a degradation (as a double one with
    --trainset CDD11_double: one underscore); an empty degradation folder stopped the whole benchmark."""
    img = np.zeros((20, 20, 3), np.uint8)
    for rel in ("clear/a.png", "haze/a.png", "haze_rain/a.png", ".ipynb_checkpoints/a.png"):
        _write(tmp_path / "cdd11/test" / rel, img)
    (tmp_path / "cdd11/test/snow").mkdir()
    unmatched = []
    pairs = benchmark_pairs(tmp_path, "cdd11", "all", unmatched)
    assert sorted(p.folder for p in pairs) == ["haze", "haze_rain"]
    assert len(unmatched) == 1 and "no images" in unmatched[0] and "snow" in unmatched[0]
    assert [p.folder for p in benchmark_pairs(tmp_path, "cdd11", "double", [])] == ["haze_rain"]
    from moceir.data.datasets import cdd11_pairs

    with pytest.raises(DatasetLayoutError, match="snow"):  # training (no unmatched list): the layout must be whole
        cdd11_pairs(tmp_path, "test", "all")


def test_a_listing_that_gives_one_inode_for_all_files_refuses_nothing(tiny_layout, monkeypatch):
    """Review: a FUSE mount without use_ino lists every file with one inode number; the duplicate check took that
    as one image and refused every folder of two images. A repeated listed inode is checked by stat."""
    import os

    import moceir.data.datasets as datasets

    real_scandir = os.scandir

    class SameInode:
        def __init__(self, entry):
            self._entry = entry

        def __getattr__(self, name):
            return getattr(self._entry, name)

        def inode(self):
            return 0xFFFFFFFF

    class Listing:
        def __init__(self, path):
            self._it = real_scandir(path)

        def __enter__(self):
            return (SameInode(e) for e in self._it)

        def __exit__(self, *exc):
            self._it.close()

    monkeypatch.setattr(datasets.os, "scandir", Listing)
    assert len(benchmark_pairs(tiny_layout, "denoise_15")) == 3


def test_a_cdd11_folder_where_nothing_pairs_does_not_stop_the_benchmark(tmp_path):
    img = np.zeros((20, 20, 3), np.uint8)
    for rel in ("clear/a.png", "haze/a.png", "snow/b.png"):
        _write(tmp_path / "cdd11/test" / rel, img)
    unmatched = []
    assert [p.folder for p in benchmark_pairs(tmp_path, "cdd11", "all", unmatched)] == ["haze"]
    assert len(unmatched) == 1 and "snow" in unmatched[0] and "no clean counterpart" in unmatched[0]
