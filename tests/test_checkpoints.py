"""Checkpoint loading and saving: every format, strictness, clear errors."""

import pytest
import torch

import moceir
from moceir.models.checkpoints import CheckpointError, infer_config, read_checkpoint

from conftest import GOLDEN, fill_deterministic


@pytest.fixture
def tiny():
    model = moceir.create_model("MoCE_IR_tiny", heads=(1, 2, 2, 4)).eval()
    fill_deterministic(model, 0.1)
    return model


def _same_output(a, b):
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_safetensors_round_trip_with_embedded_config(tmp_path, tiny):
    path = moceir.save_model(tiny, tmp_path / "m.safetensors")
    loaded = moceir.load_model(path)
    assert loaded.config == tiny.config and not loaded.training
    assert _same_output(tiny, loaded)


def test_fp16_safetensors_loads_into_fp32(tmp_path, tiny):
    path = moceir.save_model(tiny, tmp_path / "m.safetensors", dtype=torch.float16)
    loaded = moceir.load_model(path)
    assert next(loaded.parameters()).dtype == torch.float32


def test_note_is_stored_and_printed_by_the_cli(tmp_path, tiny):
    from moceir.models.checkpoints import checkpoint_note  # what the CLI calls (restore, test, routing)

    path = moceir.save_model(tiny, tmp_path / "m.safetensors", note="a test model, 3 steps")
    assert checkpoint_note(str(path)) == "a test model, 3 steps"
    assert checkpoint_note(str(moceir.save_model(tiny, tmp_path / "plain.safetensors"))) == ""


@pytest.mark.parametrize("wrap", ["plain", "module", "compiled", "lightning"])
def test_state_dict_formats_infer_config(tmp_path, tiny, wrap):
    sd = tiny.state_dict()
    prefix = {"plain": "", "module": "module.", "compiled": "_orig_mod.", "lightning": "net."}[wrap]
    sd = {prefix + k: v for k, v in sd.items()}
    obj = {"state_dict": sd, "epoch": 3} if wrap == "lightning" else sd
    torch.save(obj, tmp_path / "m.pt")
    loaded = moceir.load_model(tmp_path / "m.pt")
    assert loaded.config.heads == (1, 2, 2, 4)
    assert _same_output(tiny, loaded)


def test_infer_config_recovers_presets():
    for name in ("MoCE_IR_S", "MoCE_IR", "MoCE_IR_tiny"):
        cfg = moceir.get_config(name)
        assert infer_config(moceir.create_model(name).state_dict()) == cfg


def test_infer_config_other_rank_rules():
    cfg = moceir.get_config("MoCE_IR_tiny", rank_type="lin", latent_dim=3, complexity_scale="min")
    assert infer_config(moceir.MoCEIR(cfg).state_dict()) == cfg


def test_upstream_checkpoint_is_lightning_with_net_prefix():
    sd, config = read_checkpoint(GOLDEN / "upstream_tiny_last.ckpt")
    assert config is None and "patch_embed.proj.weight" in sd


def test_mismatch_names_missing_unexpected_and_misshaped_keys(tmp_path, tiny):
    sd = tiny.state_dict()
    sd.pop("output.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["patch_embed.proj.weight"] = torch.zeros(8, 3, 5, 5)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        moceir.load_model(tmp_path / "bad.pt", config=tiny.config)
    msg = str(err.value)
    assert "output.weight" in msg and "extra.weight" in msg and "patch_embed.proj.weight" in msg
    assert "missing" in msg and "unexpected" in msg and "mis-shaped" in msg


def test_config_mismatch_is_reported(tmp_path, tiny):
    path = moceir.save_model(tiny, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        moceir.load_model(path, config=moceir.get_config("MoCE_IR_tiny", dim=16))


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        moceir.load_model(tmp_path / "nope.ckpt")
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes((GOLDEN / "upstream_tiny_last.ckpt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="trunc.ckpt"):
        moceir.load_model(truncated)
    text = tmp_path / "text.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot read"):
        moceir.load_model(text)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="cannot read"):
        moceir.load_model(tmp_path / "evil.ckpt")


def test_lightning_checkpoint_entries_outside_net_are_dropped(tmp_path, tiny_model):
    """Mutation audit: in a Lightning checkpoint only net.* is the network (a module may also keep a loss with
    buffers, or an EMA copy); such a file loads, without failing on unexpected keys."""
    sd = {f"net.{k}": v for k, v in tiny_model.state_dict().items()}
    sd["loss_fn.weight"] = torch.ones(3)
    sd["ema.output.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd, "epoch": 1, "global_step": 5}, tmp_path / "last.ckpt")
    loaded = moceir.load_model(tmp_path / "last.ckpt", channels_last=False)
    torch.testing.assert_close(loaded.state_dict()["output.weight"], tiny_model.state_dict()["output.weight"])
