"""MoCE-IR model definition: config, layers, experts, router, network, checkpoints."""

import torch

from .config import PRESETS, MoCEConfig, get_config
from .network import MoCEIR, MoCEOutput
from .router import RouterOutput


def create_model(name: str = "MoCE_IR_S", device: str = "cpu", channels_last: bool = True, **overrides) -> MoCEIR:
    """Build preset ``name`` (``MoCE_IR_S``, ``MoCE_IR``, ``MoCE_IR_tiny``) with config field overrides.

    ``channels_last`` stores the weights channels-last (the default): the same outputs, faster convolutions.
    """
    model = MoCEIR(get_config(name, **overrides)).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


__all__ = ["PRESETS", "MoCEConfig", "MoCEIR", "MoCEOutput", "RouterOutput", "create_model", "get_config"]
