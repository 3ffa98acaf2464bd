"""ONNX through the command line: export by suffix, restore and info through the same pipeline as PyTorch."""

import numpy as np
import pytest

from moceir.cli import main
from moceir.io import load_image, save_image


@pytest.fixture(scope="module")
def exported(onnx_cli_export):
    return onnx_cli_export


def test_export_refuses_unknown_suffix_and_existing_file(exported, capsys):
    root, ckpt, onnx = exported
    assert main(["export", ckpt, str(root / "model.pt")]) == 2
    assert "suffix" in capsys.readouterr().err and not (root / "model.pt").exists()
    before = (root / "tiny.onnx").read_bytes()
    assert main(["export", ckpt, onnx]) == 2
    assert (root / "tiny.onnx").read_bytes() == before


def test_restore_with_onnx_equals_pytorch(exported, tmp_path):
    root, ckpt, onnx = exported
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for name, size in (("a.png", (24, 32)), ("b.png", (24, 32)), ("odd.png", (37, 21))):
        save_image(tmp_path / "in" / name, rng.random((*size, 3)).astype(np.float32))
    for engine, model in (("torch", ckpt), ("onnx", onnx)):
        assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / engine), "--checkpoint", model,
                     "--quiet", "--report", str(tmp_path / f"{engine}.json")]) == 0
    for name in ("a.png", "b.png", "odd.png"):
        a, b = load_image(tmp_path / "torch" / name).rgb, load_image(tmp_path / "onnx" / name).rgb
        assert np.abs(a - b).max() <= 1 / 255


def test_experts_skip_with_an_onnx_model_is_one_line(exported, tmp_path, capsys):
    root, ckpt, onnx = exported
    save_image(tmp_path / "a.png", np.zeros((16, 16, 3), np.float32))
    assert main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--checkpoint", onnx,
                 "--experts", "skip", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--experts skip needs a PyTorch checkpoint" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_global_tile_routing_with_an_onnx_model_is_refused_before_any_image(exported, tmp_path, capsys):
    """Probe (2026-12-07): the run restored the small images before a tiled one, then stopped the whole batch
    (exit 2) at it: the images after it were never restored and the report was never written."""
    root, ckpt, onnx = exported
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for name, side in (("a.png", 16), ("b.png", 200), ("c.png", 16)):
        save_image(tmp_path / "in" / name, rng.random((side, side, 3)).astype(np.float32))
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", onnx, "--quiet",
                 "--tile_routing", "global", "--tile", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tile_routing global needs a PyTorch checkpoint" in err and onnx in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_export_refuses_to_write_an_onnx_graph_under_another_name(exported, tmp_path, capsys):
    """Probe (2026-12-07): `moceir export m photo.png --format onnx --overwrite` replaced the photo with a 94 MB
    ONNX graph (exit 0); without --overwrite it left a .png that a later restore of the folder failed on."""
    root, ckpt, onnx = exported
    photo = tmp_path / "photo.png"
    save_image(photo, np.zeros((16, 16, 3), np.float32))
    before = photo.read_bytes()
    for name, extra in (("photo.png", ["--overwrite"]), ("new.png", []), ("model", [])):
        assert main(["export", ckpt, str(tmp_path / name), "--format", "onnx", "--no-optimize", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "must be named .onnx" in err and "\n" not in err, err
    assert photo.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


def test_info_describes_an_onnx_model(exported, capsys):
    assert main(["info", exported[2], "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "ONNX" in out and "tiny test export" in out and "parameters:" in out
    # the same counts as for the checkpoint it was exported from (2.31 against 2.35 GFLOPs at 256, until 2026-12-07)
    assert main(["info", exported[1], "--size", "256"]) == 0 and main(["info", exported[2], "--size", "256"]) == 0
    counts = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("  expert ", "  total: "))]
    assert len(counts) == 10 and counts[:5] == counts[5:], counts


def test_damaged_onnx_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    assert main(["restore", str(tmp_path), "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "bad.onnx"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.onnx" in err


def test_export_hides_torch_internal_notices(caplog, recwarn):
    import logging
    import warnings

    from moceir.onnx import _quiet_exporter

    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    with caplog.at_level(logging.WARNING), _quiet_exporter():
        log.warning("torchvision is not installed. Skipping torchvision::nms")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning)
    assert not caplog.records and not [w for w in recwarn if "LeafSpec" in str(w.message)]
    log.warning("after the export, notices show again")
    assert caplog.records


def test_restore_with_an_onnx_model_prints_its_note(exported, tmp_path, capsys):
    """Probe: `restore --checkpoint noted.onnx` printed no note (info did): an export of the bundled model lost
    its "early, weak model" warning."""
    save_image(tmp_path / "a.png", np.zeros((16, 16, 3), np.float32))
    assert main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--checkpoint", exported[2]]) == 0
    assert "model: tiny test export" in capsys.readouterr().out


def test_a_graph_with_moceir_metadata_but_another_signature_is_one_line(tmp_path, capsys):
    """Probe: an ONNX graph carrying moceir's metadata but taking another input (or returning a cut image) ended
    in a traceback (ONNX Runtime's "Required inputs (['x']) are missing"), or in an error about a [0, 64, 3] array
    that named no cause."""
    import json

    import onnx
    from onnx import TensorProto, helper

    import moceir
    from moceir.models.checkpoints import CONFIG_KEY

    config = json.dumps(moceir.get_config("MoCE_IR_tiny").to_dict())
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 3, "h", "w"])
    restored = helper.make_tensor_value_info("restored", TensorProto.FLOAT, ["b", 3, None, "w"])
    experts = helper.make_tensor_value_info("experts", TensorProto.INT64, [3, 1, 1])

    def write(name: str, nodes: list, inputs: list, outputs: list, initializers: list = ()) -> str:
        model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, list(initializers)),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        helper.set_model_props(model, {CONFIG_KEY: config, "format": "moceir"})
        onnx.save(model, tmp_path / name)
        return str(tmp_path / name)

    constant = helper.make_node("Constant", [], ["experts"], value=helper.make_tensor("e", TensorProto.INT64,
                                                                                      [3, 1, 1], [0, 0, 0]))
    other_input = write("x.onnx", [helper.make_node("Identity", ["x"], ["restored"]), constant],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"])],
                        [restored, experts])
    cut = write("cut.onnx", [helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["restored"]), constant],
                [image], [restored, experts],
                [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("starts", 0), ("ends", 1),
                                                                                  ("axes", 2))])
    (tmp_path / "in").mkdir()
    save_image(tmp_path / "in" / "a.png", np.zeros((16, 16, 3), np.float32))
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "o1"), "--checkpoint", other_input]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"error: {other_input}: its graph takes x ")
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "o2"), "--checkpoint", cut]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"error: {cut}: its graph returned restored "
                                                                      "[1, 3, 1, 48] and experts [3, 1, 1] for an "
                                                                      "input of [1, 3, 48, 48]")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ""])
def test_an_onnx_graph_under_another_name_is_called_one(exported, tmp_path, suffix, capsys):
    """Probe: an exported graph renamed model.safetensors was "SafetensorError: Error while deserializing header:
    header too large (is the file complete ...?)", blaming a whole file; as .ckpt it was "not a checkpoint"."""
    import shutil

    root, ckpt, onnx = exported
    renamed = tmp_path / f"model{suffix}"
    shutil.copyfile(onnx, renamed)
    for command in (["info", str(renamed)], ["restore", str(root), "-o", str(tmp_path / "out"), "--checkpoint",
                                            str(renamed)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {renamed} is an ONNX graph named ") and "rename it to model.onnx" in err, err
