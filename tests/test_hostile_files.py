"""Image files and names that lost data or slipped past the guards (a hostile probe of restore, 2026-12-07)."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import moceir
from moceir.cli import main
from moceir.io import image_size, load_image, save_image


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_model):
    return str(moceir.save_model(tiny_model, tmp_path / "tiny.safetensors"))


def _png16(path, arr, sbit=None):
    """arr: uint16 [H, W, 3] as a 16-bit RGB PNG, with an sBIT chunk of ``sbit`` significant bits if given."""
    png = pytest.importorskip("png")
    h, w, _ = arr.shape
    with open(path, "wb") as f:
        png.Writer(w, h, greyscale=False, bitdepth=16).write(f, arr.reshape(h, w * 3))
    if sbit:
        data, chunk = path.read_bytes(), b"sBIT" + bytes([sbit] * 3)
        # after the signature (8 bytes) and IHDR (25): length, type + data, CRC
        path.write_bytes(data[:33] + struct.pack(">I", 3) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:])


def test_a_16_bit_png_with_an_sbit_chunk_is_read_at_full_range(tmp_path):
    """Probe: pypng's asDirect() shifts the samples down to sBIT's 12 bits; they were still divided by 65535, so
    the image came out 16 times too dark (the output's maximum 4231 of 65535), exit 0."""
    arr = np.linspace(0, 65535, 16 * 16 * 3).round().astype(np.uint16).reshape(16, 16, 3)
    _png16(tmp_path / "plain.png", arr)
    _png16(tmp_path / "sbit.png", arr, sbit=12)
    plain, sbit = load_image(tmp_path / "plain.png"), load_image(tmp_path / "sbit.png")
    assert sbit.bit_depth == 16 and sbit.rgb.max() == 1.0
    assert np.abs(plain.rgb - sbit.rgb).max() <= 1 / 4095  # the 4 bits sBIT calls insignificant
    assert np.abs(np.asarray(Image.open(tmp_path / "sbit.png").convert("RGB")) / 255 - sbit.rgb).max() < 1 / 255


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_an_8_bit_png_colour_key_is_kept_as_alpha(tmp_path, tiny_ckpt, mode):
    """Probe: the tRNS colour key of a gray or RGB PNG (PIL's info["transparency"]) was dropped without a word;
    only palette images kept theirs (and 16-bit PNGs, through pypng)."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    key = 0 if mode == "L" else (0, 0, 0)
    im = Image.fromarray(values if mode == "L" else np.stack([values] * 3, -1))
    im.save(tmp_path / "k.png", transparency=key)
    loaded = load_image(tmp_path / "k.png")
    assert loaded.alpha is not None and loaded.alpha[0, 0] == 0 and (loaded.alpha.ravel()[1:] == 1).all()
    assert loaded.grayscale == (mode == "L")
    assert main(["restore", str(tmp_path / "k.png"), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt,
                 "--quiet"]) == 0
    out = Image.open(tmp_path / "out" / "k.png")
    assert out.mode in ("LA", "RGBA") and np.asarray(out)[0, 0, -1] == 0 and np.asarray(out)[0, 1, -1] == 255


def _gray_alpha_tiff(path, h, w):
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(path, np.zeros((h, w, 2), np.uint16), photometric="minisblack", extrasamples=["unassalpha"],
                     compression="zlib")


def test_a_16_bit_gray_alpha_tiff_has_a_size_and_meets_the_pixel_limit(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """Probe: PIL cannot open this kind of TIFF, so image_size() said None (no tiling plan, no demo limit) and
    load_image decoded it without PIL's decompression-bomb limit: a small zlib file of 250 megapixels would have
    been decoded into many GB instead of refused in one line."""
    _gray_alpha_tiff(tmp_path / "ga.tif", 60, 80)
    assert image_size(tmp_path / "ga.tif") == (60, 80)
    assert load_image(tmp_path / "ga.tif").alpha is not None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4,800 pixels: more than twice the limit, PIL's error
    with pytest.raises(moceir.io.ImageReadError, match=r"ga.tif: image too large \(4800 pixels"):
        load_image(tmp_path / "ga.tif")
    save_image(tmp_path / "ok.png", np.zeros((16, 16, 3), np.float32))
    assert main(["restore", str(tmp_path / "ga.tif"), str(tmp_path / "ok.png"), "-o", str(tmp_path / "out"),
                 "--checkpoint", tiny_ckpt, "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ga.tif: image too large" in err[0] and "Traceback" not in err[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.png"]


def test_a_folder_input_leaves_hidden_files_out(tmp_path, tiny_ckpt, capsys):
    """Probe: `restore folder` took macOS's `._a.png` resource forks (and a killed run's temporary files) for
    images and failed on them (exit 1); training, and globs, leave hidden files out."""
    (tmp_path / "in").mkdir()
    save_image(tmp_path / "in" / "a.png", np.zeros((16, 16, 3), np.float32))
    (tmp_path / "in" / "._a.png").write_bytes(b"\0\5\26\7 Mac OS X resource fork")
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt,
                 "--quiet"]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]
    # named by itself, a hidden file is an input like any other
    assert main(["restore", str(tmp_path / "in" / "._a.png"), "-o", str(tmp_path / "o2"), "--checkpoint", tiny_ckpt,
                 "--quiet"]) == 1
    assert "._a.png: cannot read image" in capsys.readouterr().err


def test_a_linked_input_is_named_as_given_and_a_second_name_of_a_file_is_said(tmp_path, tiny_ckpt, capsys):
    """Probe: an input link album/holiday.png -> ../store/blob.bin was written as out/blob.png; a link
    beach_copy.png -> beach.png in the same folder was dropped without a word ("restored 2" of 3 entries)."""
    rng = np.random.default_rng(0)
    (tmp_path / "store").mkdir()
    (tmp_path / "album").mkdir()
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "store" / "blob.bin", "PNG")
    (tmp_path / "album" / "holiday.png").symlink_to(tmp_path / "store" / "blob.bin")
    save_image(tmp_path / "album" / "beach.png", rng.random((16, 16, 3)).astype(np.float32))
    (tmp_path / "album" / "beach_copy.png").symlink_to("beach.png")
    assert main(["restore", str(tmp_path / "album"), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt,
                 "--report", str(tmp_path / "r.json")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["beach.png", "holiday.png"]
    err = capsys.readouterr().err
    assert (f"note: {tmp_path / 'album' / 'beach_copy.png'} is the same file as {tmp_path / 'album' / 'beach.png'}; "
            "restoring it once, under the name beach.png") in err
    rows = json.loads((tmp_path / "r.json").read_text())["images"]
    assert sorted(r["input"] for r in rows) == [str(tmp_path / "album" / n) for n in ("beach.png", "holiday.png")]
    # an output folder that is a link to the input folder still never overwrites an input
    (tmp_path / "same").symlink_to(tmp_path / "album")
    before = (tmp_path / "album" / "beach.png").read_bytes()
    assert main(["restore", str(tmp_path / "album" / "beach.png"), "-o", str(tmp_path / "same"), "--checkpoint",
                 tiny_ckpt, "--quiet", "--overwrite"]) == 1
    assert "would overwrite an input" in capsys.readouterr().err
    assert (tmp_path / "album" / "beach.png").read_bytes() == before


def test_sigterm_stops_a_restore_like_ctrl_c_and_leaves_no_temporary_file(tmp_path, tiny_ckpt):
    """Probe: SIGTERM (kill, timeout, SLURM) in the middle of a restore killed it where it stood: a half-written
    temporary file (.i03.plzyeaou.png) stayed in -o, and a later `restore` of that folder restored it."""
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(60):
        save_image(tmp_path / "in" / f"i{i:02d}.png", rng.random((96, 96, 3)).astype(np.float32))
    out = tmp_path / "out"
    err_file = (tmp_path / "err.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "moceir", "restore", str(tmp_path / "in"), "-o", str(out),
                             "--checkpoint", tiny_ckpt, "--quiet"], stdout=subprocess.DEVNULL, stderr=err_file,
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and len(list(out.glob("*.png"))) < 3:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        err_file.close()
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: moceir restore stopped by SIGTERM; files written"), err
    assert "Traceback" not in err
    done = list(out.iterdir())
    assert 3 <= len(done) < 60 and all(not p.name.startswith(".") for p in done), sorted(p.name for p in done)
    assert all(load_image(p).rgb.shape == (96, 96, 3) for p in done)  # every file there is whole


def test_sigterm_handler_is_given_back_to_an_in_process_caller(tmp_path):
    """main() makes SIGTERM stop a command as Ctrl-C does; a caller's own handler is left as it was after it."""
    before = signal.getsignal(signal.SIGTERM)
    assert main(["info", "MoCE_IR_tiny", "--size", "32"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_input_with_dots_after_a_linked_folder_is_the_file_the_system_finds(tmp_path, tiny_ckpt, monkeypatch):
    """Review (2026-12-07): `link/../x.png`, link -> ../real/sub, was read as work/x.png (the link's own parent):
    "does not exist", or another file of that name restored in its place."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    save_image(tmp_path / "real" / "x.png", np.zeros((16, 16, 3), np.float32))
    save_image(tmp_path / "work" / "x.png", np.ones((16, 16, 3), np.float32))  # a decoy under the wrong reading
    (tmp_path / "work" / "link").symlink_to("../real/sub")
    monkeypatch.chdir(tmp_path / "work")
    rows = moceir.restore_files(["link/../x.png"], tmp_path / "out", tiny_ckpt, progress=False, log=lambda s: None)
    assert [r["input"] for r in rows] == [str(tmp_path / "real" / "x.png")]


def test_a_1_bit_png_colour_key_is_kept_as_alpha(tmp_path):
    """Review (2026-12-07): a 1-bit gray PNG with tRNS opens in PIL's mode "1", which the fix had left out."""
    png = pytest.importorskip("png")
    with open(tmp_path / "b.png", "wb") as f:
        png.Writer(4, 4, greyscale=True, bitdepth=1, transparent=0).write(f, [[0, 1, 0, 1]] * 4)
    loaded = load_image(tmp_path / "b.png")
    assert loaded.alpha is not None and loaded.alpha[0].tolist() == [0, 1, 0, 1] and loaded.grayscale


def test_a_folder_of_hidden_images_only_says_they_were_left_out(tmp_path, tiny_ckpt, capsys):
    (tmp_path / "hid").mkdir()
    save_image(tmp_path / "hid" / ".a.png", np.zeros((16, 16, 3), np.float32))
    assert main(["restore", str(tmp_path / "hid"), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt,
                 "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "folder has no images" in err and "but 1 hidden file(s) (.a.png), left out" in err and "\n" not in err


def test_a_folder_of_links_to_another_inputs_files_is_one_note_not_one_per_file(tmp_path, tiny_ckpt, capsys):
    """Review (2026-12-07): each file's second name was its own note. A folder reached through a link is the same
    folder (its files are the same names), restored once without a note, as a folder given twice."""
    (tmp_path / "in").mkdir()
    (tmp_path / "links").mkdir()
    for i in range(3):
        save_image(tmp_path / "in" / f"{i}.png", np.zeros((16, 16, 3), np.float32))
        (tmp_path / "links" / f"{i}.png").symlink_to(f"../in/{i}.png")
    (tmp_path / "again").symlink_to("in")
    assert main(["restore", str(tmp_path / "in"), str(tmp_path / "again"), str(tmp_path / "links"), "-o",
                 str(tmp_path / "out"), "--checkpoint", tiny_ckpt]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: 3 files in {tmp_path / 'links'} are the same files as in {tmp_path / 'in'}; restoring "
                     "each once, under its name there"], notes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png", "2.png"]


def test_a_16_bit_input_written_as_jpeg_is_told_it_loses_bits(tmp_path, tiny_ckpt, capsys):
    """Review: a 16-bit PNG restored with --ext jpg was written with 8 bits without a word (alpha had a note)."""
    _png16(tmp_path / "a.png", np.full((16, 16, 3), 40000, np.uint16))
    assert main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--ext", "jpg",
                 "--checkpoint", tiny_ckpt, "--device", "cpu"]) == 0
    assert (f"note: {tmp_path / 'a.png'} has 16 bits per sample, which .jpg cannot hold; it is written with 8 "
            "(--ext png or tif keeps 16)") in capsys.readouterr().err
    assert main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--ext", "tif",
                 "--checkpoint", tiny_ckpt, "--device", "cpu"]) == 0
    assert "16 bits per sample" not in capsys.readouterr().err


def test_a_name_that_is_not_utf_8_comes_back_from_the_report(tmp_path, tiny_ckpt):
    """README: the report writes such a name with Python's escapes, which os.fsencode turns back into its bytes."""
    folder = os.fsencode(tmp_path / "in")
    os.mkdir(folder)
    name = os.path.join(folder, b"caf\xe9.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.fsdecode(name), format="PNG")
    assert main(["restore", os.fsdecode(folder), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt,
                 "--device", "cpu", "--report", str(tmp_path / "r.json")]) == 0
    with open(tmp_path / "r.json") as f:
        assert os.fsencode(json.load(f)["images"][0]["input"]) == name


def test_a_report_or_export_through_a_link_into_proc_is_refused_before_any_image(tmp_path, tiny_ckpt, capsys):
    """Probe: `--report /dev/stdout --overwrite` with stdout in a file (as root) replaced the system's /dev/stdout
    link with the report (/dev/stdout -> /proc/self/fd/1 -> the file: regular, so "replaceable"); export did the
    same. A report to a pipe was refused only after every image was restored."""
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    stream = open(tmp_path / "stream.txt", "w")  # a regular file behind /proc/self/fd/N, as stdout in a file is
    (tmp_path / "stdout").symlink_to(f"/proc/self/fd/{stream.fileno()}")
    (tmp_path / "chain").symlink_to(tmp_path / "stdout")
    for link in ("stdout", "chain"):
        assert main(["restore", str(img), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt, "--device", "cpu",
                     "--report", str(tmp_path / link), "--overwrite"]) == 2
        assert f"error: --report {tmp_path / link} is a device, pipe or socket (or a link to one)" in \
            capsys.readouterr().err
        assert os.readlink(tmp_path / "stdout") == f"/proc/self/fd/{stream.fileno()}"
        assert not (tmp_path / "out").exists()
    assert main(["export", tiny_ckpt, str(tmp_path / "chain"), "--format", "safetensors", "--overwrite"]) == 2
    assert "is a device, pipe or socket" in capsys.readouterr().err
    assert os.readlink(tmp_path / "stdout") == f"/proc/self/fd/{stream.fileno()}" and os.path.islink(tmp_path / "chain")
    stream.close()


def test_a_report_named_as_the_checkpoint_is_refused(tmp_path, tiny_ckpt, capsys):
    """Probe: `--report model.safetensors --overwrite` with `--checkpoint model.safetensors` replaced the model by
    the report (exit 0); export already refused to write over what it exports."""
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    before = open(tiny_ckpt, "rb").read()
    assert main(["restore", str(img), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt, "--device", "cpu",
                 "--report", tiny_ckpt, "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --report {tiny_ckpt} is one of the inputs (an image or the "
                                              "checkpoint)")
    assert open(tiny_ckpt, "rb").read() == before


def test_a_name_that_is_not_utf_8_is_printed_where_stdout_is_strict(tmp_path, tiny_ckpt):
    """Probe: with PYTHONIOENCODING=utf-8 (strict, as some locales make it), `restore -o $'o\\xff'` wrote the image,
    then failed with a traceback printing the output's name (exit 1)."""
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    out = os.path.join(os.fsencode(tmp_path), b"o\xff")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "moceir", "restore", str(img), "-o", out, "--checkpoint", tiny_ckpt,
                           "--device", "cpu"], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"Traceback" not in done.stderr and os.path.isfile(os.path.join(out, b"a.png"))


def test_an_output_folder_named_through_a_link_and_dots_is_the_one_the_kernel_means(tmp_path, tiny_ckpt):
    """Probe: `-o lnk/../outx` (lnk -> deep/inner) made deep/outx (the kernel's meaning) but wrote into ./outx
    (os.path.abspath's): every image failed with "No such file or directory", and an empty folder was left."""
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    (tmp_path / "deep" / "inner").mkdir(parents=True)
    (tmp_path / "lnk").symlink_to(tmp_path / "deep" / "inner")
    assert main(["restore", str(img), "-o", str(tmp_path / "lnk" / ".." / "outx"), "--checkpoint", tiny_ckpt,
                 "--device", "cpu", "--report", str(tmp_path / "lnk" / ".." / "outx" / "r.json")]) == 0
    assert (tmp_path / "deep" / "outx" / "a.png").is_file() and (tmp_path / "deep" / "outx" / "r.json").is_file()
    assert not (tmp_path / "outx").exists()


def test_too_few_open_files_for_loader_workers_decodes_in_the_process(tmp_path, tiny_ckpt):
    """Probe: under `ulimit -n 15`, `restore --num_workers 2` failed in os.pipe() with a traceback; where one
    worker had started, its end printed a second (our SIGTERM handler, inherited by the fork)."""
    (tmp_path / "in").mkdir()
    for i in range(6):
        Image.fromarray(np.full((16, 16 + 8 * i, 3), i, np.uint8)).save(tmp_path / "in" / f"{i}.png")
    code = ("import resource, sys; from moceir.cli import main; n = int(sys.argv[1]); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); sys.exit(main(sys.argv[2:]))")
    notes = 0
    for limit in (10, 12, 13):  # where the limit is met depends on what torch has opened (12: one worker started)
        argv = ["restore", str(tmp_path / "in"), "-o", str(tmp_path / f"out{limit}"), "--checkpoint", tiny_ckpt,
                "--device", "cpu", "--num_workers", "2"]
        done = subprocess.run([sys.executable, "-c", code, str(limit), *argv], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0 and "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, \
            (limit, done.stderr[-3000:])
        assert len(list((tmp_path / f"out{limit}").iterdir())) == 6
        notes += "note: too many open files to start 2 loader worker(s)" in done.stderr
    assert notes, "no limit was low enough to matter"


@pytest.mark.parametrize("kind", ["gray_alpha_16", "rgb_16", "rgb_8"])
def test_a_tiff_with_an_orientation_tag_is_turned_and_sized_as_it_is_shown(tmp_path, tiny_ckpt, kind):
    """Probe: a 16-bit gray + alpha TIFF (read by tifffile, not PIL) with Orientation 6 was restored unturned (exit
    0), while RGB ones were turned; and image_size turned RGB TIFFs twice (PIL reports their size turned)."""
    tifffile = pytest.importorskip("tifffile")
    tags = [(274, "H", 1, 6, True)]
    if kind == "gray_alpha_16":
        arr = np.zeros((16, 32, 2), np.uint16)
        arr[:4, :, 0], arr[..., 1] = 65535, 65535
        tifffile.imwrite(tmp_path / "a.tif", arr, photometric="minisblack", extrasamples=["unassalpha"], extratags=tags)
    else:
        dtype = np.uint16 if kind == "rgb_16" else np.uint8
        arr = np.zeros((16, 32, 3), dtype)
        arr[:4] = np.iinfo(dtype).max
        tifffile.imwrite(tmp_path / "a.tif", arr, photometric="rgb", extratags=tags)
    img = load_image(tmp_path / "a.tif")
    assert img.rgb.shape == (32, 16, 3) and image_size(tmp_path / "a.tif") == (32, 16)
    assert img.rgb[:, -4:].min() == 1.0 and img.rgb[:, :-4].max() == 0.0  # the top rows, shown on the right (6)
    assert main(["restore", str(tmp_path / "a.tif"), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt,
                 "--device", "cpu", "--quiet"]) == 0
    assert load_image(tmp_path / "out" / "a.tif").rgb.shape == (32, 16, 3)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="this machine has no /dev/shm")
def test_regular_files_in_dev_shm_are_replaced_as_anywhere(tmp_path, tiny_ckpt):
    """Review: the /dev check refused a regular file on /dev/shm (a tmpfs) as a device: a second restore with
    --overwrite failed, and training there failed at its second checkpoint."""
    import shutil
    import tempfile

    from moceir.io import special_file, write_atomically

    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        write_atomically(shm / "a.json", lambda tmp: tmp.write_text("1"), overwrite=True)
        assert not special_file(shm / "a.json")
        write_atomically(shm / "a.json", lambda tmp: tmp.write_text("2"), overwrite=True)
        assert (shm / "a.json").read_text() == "2"
        img = tmp_path / "a.png"
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
        for extra in ([], ["--overwrite"]):
            assert main(["restore", str(img), "-o", str(shm / "out"), "--checkpoint", tiny_ckpt, "--device", "cpu",
                         "--quiet", *extra]) == 0
        (shm / "link").symlink_to(shm / "a.json")
        assert not special_file(shm / "link")  # only a chain through /proc is (/dev/stdout -> /proc/self/fd/1)
    finally:
        shutil.rmtree(shm)


@pytest.mark.parametrize("depth", [2, 4])
def test_a_low_bit_gray_png_keeps_its_transparent_colour_key(tmp_path, depth):
    """Probe: a 4-bit gray PNG with tRNS key 15 lost all 192 transparent pixels (exit 0, no note): PIL scales the
    samples to 8 bits (15 -> 255) but leaves the key at 15, which then matched no pixel."""
    png = pytest.importorskip("png")
    top = 2 ** depth - 1
    rows = np.arange(6 * 8).reshape(6, 8) % (top + 1)
    with open(tmp_path / "key.png", "wb") as f:
        png.Writer(8, 6, greyscale=True, bitdepth=depth, transparent=top).write(f, rows.tolist())
    got = load_image(tmp_path / "key.png")
    assert got.alpha is not None and np.array_equal(got.alpha == 0, rows == top)
    np.testing.assert_allclose(got.rgb[..., 0], rows / top, atol=1e-6)


@pytest.mark.parametrize("magic, channels, maxval", [(b"P6", 3, 65535), (b"P5", 1, 65535), (b"P6", 3, 1023)])
def test_a_pgm_or_ppm_of_more_than_8_bits_keeps_them(tmp_path, magic, channels, maxval, capsys):
    """Probe: a 16-bit PPM was written as an 8-bit PNG without a word (PIL reads it as 8 bits), and a 16-bit PGM
    was refused as "32-bit or signed integer samples (PIL mode I)", which it does not hold."""
    rng = np.random.default_rng(0)
    samples = rng.integers(0, maxval + 1, (5, 7, channels)).astype(">u2")
    path = tmp_path / "deep.pnm"
    path.write_bytes(magic + b"\n# a comment\n7 5\n" + str(maxval).encode() + b"\n" + samples.tobytes())
    got = load_image(path)
    assert got.bit_depth == 16 and got.grayscale == (channels == 1)
    np.testing.assert_allclose(got.rgb, np.broadcast_to(samples / maxval, (5, 7, 3)), atol=1e-6)
    from moceir.io import read_rgb

    np.testing.assert_array_equal(read_rgb(path), np.round(got.rgb * 255).astype(np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(moceir.io.ImageReadError, match="deep.pnm: .* the file is truncated"):
        load_image(path)


@pytest.mark.parametrize("samples", [1, 3])
def test_a_16_bit_lzw_tiff_is_read(tmp_path, samples):
    """Probe: a 16-bit LZW TIFF (common from photo editors) was refused as "truncated, empty, not an image, or in
    a variant moceir does not read": tifffile decodes LZW only with imagecodecs, which is now a dependency."""
    tifffile = pytest.importorskip("tifffile")
    arr = np.random.default_rng(0).integers(0, 65536, (5, 7, samples)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "lzw.tif", arr[..., 0] if samples == 1 else arr, compression="lzw")
    got = load_image(tmp_path / "lzw.tif")
    assert got.bit_depth == 16
    np.testing.assert_array_equal(np.round(got.rgb * 65535), np.broadcast_to(arr, (5, 7, 3)))


def test_without_imagecodecs_an_lzw_tiff_says_what_to_install(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "lzw.tif", np.zeros((5, 7, 3), np.uint16), compression="lzw")
    code = ("import sys; sys.modules['imagecodecs'] = None\nfrom moceir.io import load_image\n"
            f"load_image({str(tmp_path / 'lzw.tif')!r})")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].endswith(
        "lzw.tif: its compression needs the imagecodecs package, which moceir depends on; pip install imagecodecs")


def test_an_image_above_pils_limit_can_be_allowed_from_the_command_line(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """Probe: an image above twice PIL.Image.MAX_IMAGE_PIXELS was refused with advice to raise that Python
    variable, which no command-line user can do. Here the limit is 1000 pixels, so a 64 x 64 image is above it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    save_image(tmp_path / "big.png", np.zeros((64, 64, 3), np.float32))
    argv = ["restore", str(tmp_path / "big.png"), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt, "--quiet"]
    monkeypatch.setenv("MOCEIR_MAX_IMAGE_PIXELS", "1000")
    assert main(argv) == 1
    assert "raise the limit (MOCEIR_MAX_IMAGE_PIXELS=2049 for moceir's commands, PIL.Image.MAX_IMAGE_PIXELS in " \
           "Python)" in capsys.readouterr().err
    monkeypatch.setenv("MOCEIR_MAX_IMAGE_PIXELS", "2049")
    assert main(argv) == 0 and (tmp_path / "out" / "big.png").is_file()
    for value in ("lots", "²"):
        monkeypatch.setenv("MOCEIR_MAX_IMAGE_PIXELS", value)
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == (f"error: MOCEIR_MAX_IMAGE_PIXELS={value!r}: give a whole number "
                                                   "of pixels (images above twice it are refused), or unset it")
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's own, set back after each command (main may run again)
