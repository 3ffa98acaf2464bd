"""FLOP counts (2 x multiply-accumulates) from torch's FlopCounterMode: convolutions, linears, matmuls.

The FFT products of the experts are not counted (FlopCounterMode does not count FFTs); they cost
O(HW log p) per channel, small beside the convolutions.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models import MoCEIR, fused


def count_flops(fn, *args, **kwargs) -> int:
    # fused.disabled(): FlopCounterMode does not see the CPU's fused oneDNN convolutions (a third of the FLOPs)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), fused.disabled():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def network_flops(model: MoCEIR, size: int = 256, expert: int | None = None) -> int:
    """Forward FLOPs at size x size for one image; ``expert`` forces that expert in every MoE layer."""
    x = torch.rand(1, model.config.inp_channels, size, size, device=next(model.parameters()).device)
    forced = None
    if expert is not None:
        forced = torch.full((model.num_moe_layers, 1, model.config.topk), expert, dtype=torch.long)
    return count_flops(model, x, False, forced)


def expert_flops_per_pixel(model: MoCEIR) -> torch.Tensor:
    """[layers, experts] FLOPs per pixel of each expert at its MoE layer (linear in the pixel count)."""
    rows = []
    for adapter in model.adapters:
        c = adapter.proj_out.in_channels
        x = torch.rand(1, c, 32, 32, device=adapter.proj_out.weight.device)
        rows.append([count_flops(adapter.expert(i), x, x) / (32 * 32) for i in range(len(adapter.experts))])
    return torch.tensor(rows, dtype=torch.float64)


def moe_layer_scales(model: MoCEIR) -> list[int]:
    """Downscaling factor of each MoE layer's features relative to the input (e.g. 4, 4, 2, 2, ..., 1)."""
    levels = model.config.levels
    return [2 ** (levels - 2 - i) for i in range(levels - 1) for _ in model.dec[i][2].layers]


def image_experts(experts: torch.Tensor, b: int) -> list:
    """Image ``b``'s entry in a report, from routing of shape [layers, B, k]: per MoE layer its expert (top-1), or
    the list of its k experts (top-k)."""
    picked = experts[:, b]
    return picked[:, 0].tolist() if picked.shape[-1] == 1 else picked.tolist()


def layer_picks(entry: int | list[int]) -> list[int]:
    """One MoE layer's entry of :func:`image_experts` as a list of the experts that ran there."""
    return [entry] if isinstance(entry, int) else list(entry)
