"""Hostile and odd checkpoints (issue 10, items 8-11): each is one line, exit 2, and costs well under a second."""

import json
import re
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import moceir
from moceir.cli import main
from moceir.models import checkpoints
from moceir.models.checkpoints import CONFIG_KEY, CheckpointError


def _safetensors_with_config(path, model, config: object) -> str:
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={CONFIG_KEY: json.dumps(config), "format": "moceir"})
    return str(path)


def _refused_by_cli(capsys, ckpt: str, *needles: str) -> str:
    code = main(["info", ckpt])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("change", [{"dim": 4096}, {"num_blocks": [1, 1, 1, 100000]}, {"dim": 16},
                                    {"num_dec_blocks": [1, 1, 3]}])
def test_item8_embedded_config_is_checked_before_building(tmp_path, tiny_model, monkeypatch, change):
    built = []
    real = checkpoints.MoCEIR
    monkeypatch.setattr(checkpoints, "MoCEIR", lambda cfg: built.append(cfg) or real(cfg))
    config = {**tiny_model.config.to_dict(), **change}
    path = _safetensors_with_config(tmp_path / "evil.safetensors", tiny_model, config)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="evil.safetensors"):
        moceir.load_model(path)
    assert time.perf_counter() - t0 < 1.0
    assert built == []  # refused before any network was built


def test_item8_cli_refuses_contradicting_config_in_one_line(tmp_path, tiny_model, capsys):
    config = {**tiny_model.config.to_dict(), "dim": 4096}
    path = _safetensors_with_config(tmp_path / "evil.safetensors", tiny_model, config)
    _refused_by_cli(capsys, path, "evil.safetensors", "dim")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wrap", ["plain", "lightning"])
def test_item9_half_checkpoints_without_config_load(tmp_path, tiny_model, dtype, wrap):
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny_model.state_dict().items()}
    obj = {"state_dict": {f"net.{k}": v for k, v in sd.items()}, "epoch": 1} if wrap == "lightning" else sd
    torch.save(obj, tmp_path / "half.ckpt")
    loaded = moceir.load_model(tmp_path / "half.ckpt")
    assert loaded.config == tiny_model.config and next(loaded.parameters()).dtype == torch.float32
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(x), tiny_model(x), atol=0.05)


def test_item9_half_checkpoint_works_in_export(tmp_path, tiny_model, capsys):
    torch.save({k: v.half() for k, v in tiny_model.state_dict().items()}, tmp_path / "half.pt")
    assert main(["export", str(tmp_path / "half.pt"), str(tmp_path / "out.safetensors")]) == 0


def test_item10_zero_byte_checkpoint(tmp_path, capsys):
    (tmp_path / "zero.ckpt").write_bytes(b"")
    _refused_by_cli(capsys, str(tmp_path / "zero.ckpt"), "zero.ckpt", "cannot read checkpoint")
    assert main(["restore", str(tmp_path), "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "zero.ckpt"),
                 "--quiet"]) == 2


@pytest.mark.parametrize("config", [{"dim": "abc"}, [8, 8], "MoCE_IR_tiny", {"num_blocks": "1111"}])
def test_item11_config_of_wrong_type(tmp_path, tiny_model, capsys, config):
    if isinstance(config, dict):
        config = {**tiny_model.config.to_dict(), **config}
    path = _safetensors_with_config(tmp_path / "typed.safetensors", tiny_model, config)
    _refused_by_cli(capsys, path, "typed.safetensors")


def test_item11_state_dict_that_is_a_list(tmp_path, capsys):
    torch.save({"state_dict": [torch.zeros(1)]}, tmp_path / "list.ckpt")
    _refused_by_cli(capsys, str(tmp_path / "list.ckpt"), "list.ckpt", "not a mapping")
    torch.save({CONFIG_KEY: [1, 2], "state_dict": {}}, tmp_path / "cfglist.ckpt")
    _refused_by_cli(capsys, str(tmp_path / "cfglist.ckpt"), "cfglist.ckpt")


def test_item11_pickle_refusal_gives_no_unsafe_advice(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.ckpt")
    err = _refused_by_cli(capsys, str(tmp_path / "evil.ckpt"), "evil.ckpt", "pickled")
    assert "weights_only=False" not in err and "ran code" not in capsys.readouterr().out


def test_truncated_and_text_checkpoints_are_one_line(tmp_path, tiny_model, capsys):
    path = moceir.save_model(tiny_model, tmp_path / "m.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(path.read_bytes()[:3000])
    _refused_by_cli(capsys, str(tmp_path / "trunc.safetensors"), "trunc.safetensors")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    _refused_by_cli(capsys, str(tmp_path / "text.ckpt"), "text.ckpt")


# ---- probe of the export and weight checks: NaN weights, temporary files, links, malformed shapes and configs


def _nan_copy(model, value: float = float("nan")) -> dict:
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    sd["output.weight"][0, 0, 0, 0] = value
    return sd


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["safetensors", "lightning"])
def test_non_finite_weights_are_refused(tmp_path, tiny_model, capsys, value, kind):
    sd = _nan_copy(tiny_model, value)
    if kind == "safetensors":
        path = tmp_path / "nan.safetensors"
        save_file(sd, str(path), metadata={CONFIG_KEY: json.dumps(tiny_model.config.to_dict()), "format": "moceir"})
    else:
        path = tmp_path / "nan.ckpt"
        torch.save({"state_dict": {f"net.{k}": v for k, v in sd.items()}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"nan\..*1 tensor\(s\) hold NaN or inf values \(output.weight\)"):
        moceir.load_model(path)
    _refused_by_cli(capsys, str(path), "nan.", "output.weight")
    assert main(["export", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "out.safetensors").exists()


def test_non_finite_bundled_default_is_refused(tmp_path, tiny_model, monkeypatch):
    save_file(_nan_copy(tiny_model), str(tmp_path / "default.safetensors"))
    monkeypatch.setattr(checkpoints, "DEFAULT_WEIGHTS", tmp_path / "default.safetensors")
    with pytest.raises(CheckpointError, match="NaN"):
        moceir.load_model("default")


class _FakeOnnxProgram:
    """What torch.onnx.export returns, as far as export_onnx's file handling needs it (no real export: fast)."""

    def __init__(self):
        self.model = SimpleNamespace(metadata_props={})

    def save(self, path: str, external_data: bool = False) -> None:
        assert path.endswith(".onnx")
        with open(path, "w") as f:
            f.write("onnx")


@pytest.fixture
def fake_onnx_export(monkeypatch):
    pytest.importorskip("onnxscript")
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: _FakeOnnxProgram())


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_export_keeps_an_unrelated_tmp_file(tmp_path, tiny_model, capsys, fake_onnx_export, suffix):
    ckpt = moceir.save_model(tiny_model, tmp_path / "tiny.safetensors")
    out = tmp_path / f"m{suffix}"
    precious = out.with_name(out.name + ".tmp")
    precious.write_text("precious")
    assert main(["export", str(ckpt), str(out), "--no-optimize"]) == 0
    assert precious.read_text() == "precious" and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny.safetensors", out.name, precious.name])


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_export_to_a_dangling_link_or_under_a_file_is_one_line(tmp_path, tiny_model, capsys, fake_onnx_export, suffix):
    ckpt = str(moceir.save_model(tiny_model, tmp_path / "tiny.safetensors"))
    link = tmp_path / f"dl{suffix}"
    link.symlink_to(tmp_path / "nowhere")
    victim = tmp_path / "victim.png"
    victim.write_text("a photo")
    for out, needle in ((link, "a link"), (victim / f"m{suffix}", "not a folder")):
        assert main(["export", ckpt, str(out), "--no-optimize"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and str(out if needle == "a link" else victim) in err, err
    assert link.is_symlink() and not (tmp_path / "nowhere").exists() and victim.read_text() == "a photo"
    with pytest.raises(FileExistsError):  # the library keeps its documented exception type
        moceir.save_model(tiny_model, link)
    assert main(["export", ckpt, str(link), "--overwrite", "--no-optimize"]) == 0
    assert not link.is_symlink() and link.is_file() and not (tmp_path / "nowhere").exists()


def _without_config(tmp_path, tiny_model, name: str, **changes) -> str:
    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    sd.update(changes)
    save_file(sd, str(tmp_path / name))
    return str(tmp_path / name)


@pytest.mark.parametrize("weight", [torch.zeros(8), torch.zeros(0, 3, 3, 3), torch.zeros(8, 3, 0)])
def test_malformed_shapes_without_config_are_one_line(tmp_path, tiny_model, capsys, weight):
    path = _without_config(tmp_path, tiny_model, "shape.safetensors", **{"patch_embed.proj.weight": weight})
    with pytest.raises(CheckpointError, match="shape.safetensors"):
        moceir.load_model(path)
    _refused_by_cli(capsys, path, "shape.safetensors", "patch_embed.proj.weight")


@pytest.mark.parametrize("change, field", [({"heads": [0, 0, 0, 0]}, "heads"), ({"dim": "48"}, "dim"),
                                           ({"dim": 8.5}, "dim"), ({"num_dec_blocks": [1, 0, 1]}, "num_dec_blocks"),
                                           ({"heads": ["1", "1", "2", "2"]}, "heads"), ({"bias": "no"}, "bias"),
                                           ({"ffn_expansion_factor": float("nan")}, "ffn_expansion_factor"),
                                           ({"latent_dim": 0}, "latent_dim"), ({"num_blocks": 4}, "num_blocks")])
def test_malformed_embedded_config_is_one_line(tmp_path, tiny_model, capsys, change, field):
    torch.save({CONFIG_KEY: {**tiny_model.config.to_dict(), **change}, "state_dict": tiny_model.state_dict()},
               tmp_path / "cfg.ckpt")
    err = _refused_by_cli(capsys, str(tmp_path / "cfg.ckpt"), "cfg.ckpt", field)
    assert "not a valid configuration" in err


def test_config_validation_keeps_valid_configs():
    from moceir.models.config import PRESETS, MoCEConfig

    for cfg in PRESETS.values():
        assert MoCEConfig.from_dict(cfg.to_dict()) == cfg
    assert MoCEConfig(num_blocks=[4, 0, 6, 8], num_refinement_blocks=0, ffn_expansion_factor=2).num_blocks[1] == 0
    with pytest.raises(ValueError, match="heads"):
        MoCEConfig(heads=(0, 0, 0, 0))


def test_random_bytes_are_not_called_a_pickle(tmp_path, capsys):
    (tmp_path / "x.ckpt").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                    dtype=torch.uint8).numpy().tobytes())
    err = _refused_by_cli(capsys, str(tmp_path / "x.ckpt"), "x.ckpt", "not a checkpoint")
    assert "pickled" not in err


def test_upper_case_suffix_is_safetensors(tmp_path, tiny_model):
    path = moceir.save_model(tiny_model, tmp_path / "model.SAFETENSORS")
    assert moceir.load_model(path).config == tiny_model.config


def test_a_plain_pickle_with_code_is_still_refused(tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("ran code",))

    for protocol in (2, 4):
        (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Payload()}, protocol=protocol))
        _refused_by_cli(capsys, str(tmp_path / "evil.pt"), "evil.pt", "pickled")
        assert "ran code" not in capsys.readouterr().out


def test_a_note_with_control_characters_is_printed_as_one_plain_line(tmp_path, tiny_model, capsys):
    """Probe: a model file's note was printed raw, so a hostile file could fake output lines or send ANSI escapes
    to the terminal (a note "line1\nline2\x1b[31mred")."""
    import numpy as np
    from PIL import Image

    from moceir.models.checkpoints import checkpoint_note

    note = "line1\nerror: fake\x1b[31mred\x07 👩\u200d💻"
    path = moceir.save_model(tiny_model, tmp_path / "m.safetensors", note=note)
    assert checkpoint_note(path) == "line1 error: fake [31mred 👩\u200d💻"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["restore", str(tmp_path / "a.png"), "--checkpoint", str(path), "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    assert "\x1b[31m" not in out.out + out.err and "\nerror: fake" not in out.out + out.err  # tqdm has its own


def test_an_onnx_graph_given_as_a_checkpoint_is_called_one(tmp_path, capsys):
    """Probe: `export x.onnx out.safetensors`, `--fine_tune_from x.onnx` and load_model("x.onnx") said "not a
    checkpoint (neither safetensors nor a PyTorch file)"."""
    graph = tmp_path / "x.onnx"
    graph.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x032.13")  # how an ONNX protobuf starts
    with pytest.raises(CheckpointError, match=r"x.onnx is an ONNX graph, .* the PyTorch checkpoint"):
        moceir.load_model(graph)
    assert main(["export", str(graph), str(tmp_path / "out.safetensors")]) == 2
    assert "is an ONNX graph" in capsys.readouterr().err


@pytest.mark.parametrize("edit, says", [({"dim": 16}, "dim 16 but the weights say 8"),
                                        ({"rank_type": "constant", "latent_dim": 3},
                                         "expert ranks [3, 3, 3, 3] but the weights say [1, 2, 4, 8]")])
def test_an_embedded_config_that_contradicts_the_weights_is_refused_before_building(tmp_path, tiny_model, capsys,
                                                                                   edit, says):
    """No test covered the embedded-config check, which now shares its comparison with the fine-tune check."""
    config = {**tiny_model.config.to_dict(), **edit}
    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    save_file(sd, str(tmp_path / "edited.safetensors"), metadata={CONFIG_KEY: json.dumps(config), "format": "moceir"})
    with pytest.raises(CheckpointError, match=rf"contradicts its weights \({re.escape(says)}\); the file is damaged"):
        moceir.load_model(tmp_path / "edited.safetensors")
    assert main(["info", str(tmp_path / "edited.safetensors")]) == 2
    assert says in capsys.readouterr().err


def test_a_checkpoint_whose_name_is_not_utf8_loads(tmp_path, tiny_model, capsys):
    """Probe: a safetensors file named with a byte that is not UTF-8 (a Latin-1 name from an old archive) was
    refused by every command as "not valid UTF-8 (is the file complete ...?)", blaming the file."""
    import os

    path = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.safetensors")
    moceir.save_model(tiny_model, path, note="latin-1 name")
    assert checkpoints.checkpoint_note(path) == "latin-1 name"
    assert moceir.load_model(path).config == tiny_model.config
    assert main(["export", path, str(tmp_path / "out.safetensors")]) == 0


def test_running_out_of_memory_reading_a_checkpoint_is_not_called_a_damaged_file(tmp_path, tiny_model, monkeypatch,
                                                                                   capsys):
    """Probe: a safetensors file whose header claims an 8 GiB extra tensor, under `ulimit -v`, ended in
    "MemoryError: Cannot allocate memory (os error 12) (is the file complete and a PyTorch/safetensors
    checkpoint?)", which sent the user to check a file that was whole."""
    import safetensors

    path = moceir.save_model(tiny_model, tmp_path / "m.safetensors")
    opened = safetensors.safe_open(str(path), framework="pt")
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: _NoMemory(opened))
    assert main(["info", str(path)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: cannot read checkpoint {path}: out of memory loading its tensors") and \
        "is the file complete" not in line, line


class _NoMemory:
    """safetensors' open file, but reading a tensor runs out of memory."""

    def __init__(self, opened):
        self.opened = opened

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def metadata(self):
        return self.opened.metadata()

    def keys(self):
        return self.opened.keys()

    def get_slice(self, name):
        return self.opened.get_slice(name)

    def get_tensor(self, name):
        raise MemoryError("Cannot allocate memory (os error 12)")


def test_tensors_no_network_has_are_refused_before_they_are_read(tmp_path, tiny_model, monkeypatch, capsys):
    """Probe: a safetensors file padded with a 2 GiB tensor named "junk" was read whole (6.0 GB resident) before
    the strict check refused it. Its header is enough: no tensor data is read."""
    import safetensors
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    path = tmp_path / "padded.safetensors"
    save_file({**sd, "junk": torch.zeros(1000)}, str(path),
              metadata={checkpoints.CONFIG_KEY: json.dumps(tiny_model.config.to_dict())})
    opened = safetensors.safe_open(str(path), framework="pt")
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: _NoMemory(opened))  # reading any tensor fails
    for with_config in (True, False):
        if not with_config:  # the header alone also infers the network of an upstream-like file
            save_file({**sd, "junk": torch.zeros(1000)}, str(path))
            opened = safetensors.safe_open(str(path), framework="pt")
        with pytest.raises(checkpoints.CheckpointError, match=r"does not match the network .*1 unexpected: \[junk\]"):
            moceir.load_model(path)
    assert main(["info", str(path)]) == 2
    assert "1 unexpected: [junk]" in capsys.readouterr().err


def test_an_overrides_error_raised_while_checking_a_header_keeps_its_type(tmp_path, tiny_model):
    """The header check builds the network; a bad override is the caller's error, not a damaged file."""
    path = moceir.save_model(tiny_model, tmp_path / "m.safetensors")
    with pytest.raises(TypeError):
        moceir.load_model(path, no_such_field=1)


def test_a_run_folder_given_as_checkpoint_names_the_files_in_it(tmp_path, tiny_model, capsys):
    """Probe: `test --ckpt runs/r1` said "does not exist or is not a file", of a folder that holds the run's model."""
    assert main(["info", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint {tmp_path} is a folder; pass a checkpoint file"
    moceir.save_model(tiny_model, tmp_path / "model.safetensors")
    assert main(["info", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: checkpoint {tmp_path} is a folder; pass a checkpoint file in "
                                               f"it, e.g. {tmp_path / 'model.safetensors'}")


def test_a_half_precision_file_padded_with_a_tensor_is_refused_from_its_header(tmp_path, tiny_model, capsys):
    """Probe (final reread): the padded-file refusal for fp16 weights, as `moceir export --dtype fp16` writes."""
    from safetensors.torch import save_file

    sd = {k: v.half().contiguous() for k, v in tiny_model.state_dict().items()}
    save_file({**sd, "junk": torch.zeros(10, dtype=torch.float16)}, str(tmp_path / "half.safetensors"))
    save_file(sd, str(tmp_path / "plain.safetensors"))
    assert main(["info", str(tmp_path / "half.safetensors")]) == 2
    assert "1 unexpected: [junk]" in capsys.readouterr().err
    assert moceir.load_model(tmp_path / "plain.safetensors").config == tiny_model.config
