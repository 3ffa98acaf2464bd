"""MoCE-IR model definition: config, layers, experts, router, network, checkpoints."""

from .config import PRESETS, MoCEConfig, get_config
from .network import MoCEIR, MoCEOutput
from .router import RouterOutput


def create_model(name: str = "MoCE_IR_S", device: str = "cpu", **overrides) -> MoCEIR:
    """Build preset ``name`` (``MoCE_IR_S``, ``MoCE_IR``, ``MoCE_IR_tiny``) with config field overrides."""
    return MoCEIR(get_config(name, **overrides)).to(device)


__all__ = ["PRESETS", "MoCEConfig", "MoCEIR", "MoCEOutput", "RouterOutput", "create_model", "get_config"]
