"""Hostile and odd checkpoints (issue 10, items 8-11): each is one line, exit 2, and costs well under a second."""

import json
import time

import pytest
import torch
from safetensors.torch import save_file

import moceir
from moceir.cli import main
from moceir.models import checkpoints
from moceir.models.checkpoints import CONFIG_KEY, CheckpointError

from conftest import fill_deterministic


@pytest.fixture
def tiny():
    model = moceir.create_model("MoCE_IR_tiny").eval()
    fill_deterministic(model, 0.05)
    return model


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
def test_item8_embedded_config_is_checked_before_building(tmp_path, tiny, monkeypatch, change):
    built = []
    real = checkpoints.MoCEIR
    monkeypatch.setattr(checkpoints, "MoCEIR", lambda cfg: built.append(cfg) or real(cfg))
    path = _safetensors_with_config(tmp_path / "evil.safetensors", tiny, {**tiny.config.to_dict(), **change})
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="evil.safetensors"):
        moceir.load_model(path)
    assert time.perf_counter() - t0 < 1.0
    assert built == []  # refused before any network was built


def test_item8_cli_refuses_contradicting_config_in_one_line(tmp_path, tiny, capsys):
    path = _safetensors_with_config(tmp_path / "evil.safetensors", tiny, {**tiny.config.to_dict(), "dim": 4096})
    _refused_by_cli(capsys, path, "evil.safetensors", "dim")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wrap", ["plain", "lightning"])
def test_item9_half_checkpoints_without_config_load(tmp_path, tiny, dtype, wrap):
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny.state_dict().items()}
    obj = {"state_dict": {f"net.{k}": v for k, v in sd.items()}, "epoch": 1} if wrap == "lightning" else sd
    torch.save(obj, tmp_path / "half.ckpt")
    loaded = moceir.load_model(tmp_path / "half.ckpt")
    assert loaded.config == tiny.config and next(loaded.parameters()).dtype == torch.float32
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(x), tiny(x), atol=0.05)


def test_item9_half_checkpoint_works_in_export(tmp_path, tiny, capsys):
    torch.save({k: v.half() for k, v in tiny.state_dict().items()}, tmp_path / "half.pt")
    assert main(["export", str(tmp_path / "half.pt"), str(tmp_path / "out.safetensors")]) == 0


def test_item10_zero_byte_checkpoint(tmp_path, capsys):
    (tmp_path / "zero.ckpt").write_bytes(b"")
    _refused_by_cli(capsys, str(tmp_path / "zero.ckpt"), "zero.ckpt", "cannot read checkpoint")
    assert main(["restore", str(tmp_path), "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "zero.ckpt"),
                 "--quiet"]) == 2


@pytest.mark.parametrize("config", [{"dim": "abc"}, [8, 8], "MoCE_IR_tiny", {"num_blocks": "1111"}])
def test_item11_config_of_wrong_type(tmp_path, tiny, capsys, config):
    if isinstance(config, dict):
        config = {**tiny.config.to_dict(), **config}
    path = _safetensors_with_config(tmp_path / "typed.safetensors", tiny, config)
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


def test_truncated_and_text_checkpoints_are_one_line(tmp_path, tiny, capsys):
    path = moceir.save_model(tiny, tmp_path / "m.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(path.read_bytes()[:3000])
    _refused_by_cli(capsys, str(tmp_path / "trunc.safetensors"), "trunc.safetensors")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    _refused_by_cli(capsys, str(tmp_path / "text.ckpt"), "text.ckpt")
