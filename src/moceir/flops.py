"""FLOP counts (2 x multiply-accumulates) from torch's FlopCounterMode: convolutions, linears, matmuls.

The FFT products of the experts are not counted (FlopCounterMode does not count FFTs); they cost
O(HW log p) per channel, small beside the convolutions. They are counted as FFTs whichever ``fft_impl`` the model
computes them with (the "matmul" path would add its DFT products, which depend on the padding to whole patches).
"""

from __future__ import annotations

import contextlib
import numbers
import operator
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .models import MoCEIR, fused
from .models.attention import FFTAttention
from .models.checkpoints import strip_wrappers


def count_flops(fn, *args, **kwargs) -> int:
    # fused.disabled(): FlopCounterMode does not see the CPU's fused oneDNN convolutions (a third of the FLOPs)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), fused.disabled():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def _fft_products(model: MoCEIR):
    """Every FFTAttention of ``model`` on fft_impl="fft" inside the block, its own impl restored after."""
    modules = [m for m in model.modules() if isinstance(m, FFTAttention)]
    impls = [m.fft_impl for m in modules]
    try:
        for m in modules:
            m.fft_impl = "fft"
        yield
    finally:
        for m, impl in zip(modules, impls):
            m.fft_impl = impl


def counted_network_flops(model: MoCEIR, size: int, expert: int | Sequence[int] | None = None) -> int:
    """Forward FLOPs at size x size for one image, counted by running ``model`` as it is (its memory layout
    included: see :func:`network_flops`; memory grows with size**2)."""
    x = torch.rand(1, model.config.inp_channels, size, size, device=next(model.parameters()).device)
    forced = None
    if expert is not None:
        picks, k = _expert_picks(model, expert), model.config.topk
        forced = torch.tensor(picks, dtype=torch.long).view(1, 1, k).repeat(model.num_moe_layers, 1, 1)
    with _fft_products(model):
        return count_flops(model, x, False, forced)


def _expert_picks(model: MoCEIR, expert: int | Sequence[int]) -> list[int]:
    """``expert`` as the list of the k experts each MoE layer runs (an integer: in each of the k slots)."""
    k, n = model.config.topk, model.config.num_exp_blocks
    one = isinstance(expert, numbers.Integral) or isinstance(expert, (torch.Tensor, np.ndarray)) and expert.ndim == 0
    try:
        picks = [expert] * k if one else list(expert)
        if any(isinstance(e, (bool, np.bool_)) for e in picks):
            raise TypeError
        picks = [operator.index(e) for e in picks]  # numpy and 0-d tensor integers too; 0.5 or 1.0 is refused
    except TypeError:
        raise TypeError(f"expert: an integer{'' if k == 1 else f' or {k} integers'}, got {expert!r}") from None
    if len(picks) != k:
        raise ValueError(f"{len(picks)} experts given for a network that runs {k} per MoE layer")
    if not all(0 <= e < n for e in picks):
        raise ValueError(f"expert {picks}: this network's experts are 0..{n - 1}")
    return picks


def network_flops(model: MoCEIR, size: int = 256, expert: int | Sequence[int] | None = None) -> int:
    """Forward FLOPs at size x size for one image; ``expert`` forces that expert in every MoE layer (top-k
    networks: in each of the k slots, or a sequence of k experts, e.g. ``(0, 1)``).

    Every counted operation costs a constant (the routers' linears) or a multiple of its level's H*W (convolutions,
    the channel attention's products), and each level's H*W is size**2 over a fixed power of 4, so the count is
    ``a + b * size**2``. With ``expert`` given, it is counted at three small sizes and extrapolated: exact, and
    ``moceir info --size 8192`` needs no 8192 x 8192 activations. Should the three not lie on one line, the network
    is run at ``size`` itself; so is it with ``expert=None`` (the routers' choice for a random image depends on its
    size) and at a size the network refuses (its error is the one raised).

    The count is the architecture's, as upstream computes it: the channel attention per head. A channels-last model
    (moceir's default) runs a form of the attention that multiplies the whole C x C Gram matrix and masks the
    blocks between heads, so :func:`counted_network_flops` of it counts more (MoCE_IR_S at 256, expert 0: 91.38
    against 84.80 GFLOPs). Here a fresh channels-first network of ``model``'s config is counted on the CPU in
    float32, with its weights (they route when ``expert`` is None), each expert run only where it is chosen
    (sparse dispatch), no expert bypassed, no hook: the same count for every layout, dtype, device and dispatch.
    """
    if expert is not None:
        expert = _expert_picks(model, expert)  # once: a generator would be spent by the first count
    fresh = MoCEIR(model.config)
    fresh.load_state_dict(strip_wrappers(model.state_dict()))  # torch.compile's or DDP's: the network it wraps
    model = fresh.eval().set_dispatch("sparse")
    m = model.config.size_multiple
    # from 2m: at m the deepest level is 1 x 1, which a channels-first network takes for channels-last (another path)
    small = [m * k for k in (2, 3, 4)]
    if expert is None or size <= small[-1] or size % m:
        return counted_network_flops(model, size, expert)
    f = [counted_network_flops(model, s, expert) for s in small]
    slope = Fraction(f[1] - f[0], small[1] ** 2 - small[0] ** 2)
    if Fraction(f[2] - f[1], small[2] ** 2 - small[1] ** 2) != slope:
        return counted_network_flops(model, size, expert)
    total = f[0] + slope * (size**2 - small[0] ** 2)
    return int(total) if total.denominator == 1 else counted_network_flops(model, size, expert)


def expert_flops_per_pixel(model: MoCEIR) -> torch.Tensor:
    """[layers, experts] FLOPs per pixel of each expert at its MoE layer (linear in the pixel count)."""
    rows = []
    with _fft_products(model):
        for adapter in model.adapters:
            c = adapter.proj_out.in_channels
            x = torch.rand(1, c, 32, 32, device=adapter.proj_out.weight.device)
            rows.append([count_flops(adapter.expert(i), x, x) / (32 * 32) for i in range(len(adapter.experts))])
    return torch.tensor(rows, dtype=torch.float64)


def moe_layer_scales(model: MoCEIR) -> list[int]:
    """Downscaling factor of each MoE layer's features relative to the input (e.g. 4, 4, 2, 2, ..., 1)."""
    levels = model.config.levels
    return [2 ** (levels - 2 - i) for i in range(levels - 1) for _ in model.dec[i][2].layers]


class ExpertCosts:
    """What each expert of a network costs at each MoE layer, for any image size (one count, at 32 x 32)."""

    def __init__(self, model: MoCEIR):
        self.per_pixel = expert_flops_per_pixel(model).numpy()  # [layers, experts]
        self.scales = np.array(moe_layer_scales(model), dtype=np.float64)  # [layers]

    def at(self, h: int, w: int) -> np.ndarray:
        """[layers, experts] FLOPs of each expert at its layer for an h x w image."""
        return self.per_pixel * (h * w / self.scales**2)[:, None]

    @staticmethod
    def spent(table: np.ndarray, experts: list) -> float:
        """FLOPs of the experts an image ran: ``table`` is :meth:`at` for its size, ``experts`` its
        :func:`image_experts` entry."""
        return float(sum(table[layer, e] for layer, entry in enumerate(experts) for e in layer_picks(entry)))


def image_experts(experts: torch.Tensor, b: int) -> list:
    """Image ``b``'s entry in a report, from routing of shape [layers, B, k]: per MoE layer its expert (top-1), or
    the list of its k experts (top-k)."""
    picked = experts[:, b]
    return picked[:, 0].tolist() if picked.shape[-1] == 1 else picked.tolist()


def layer_picks(entry: int | list[int]) -> list[int]:
    """One MoE layer's entry of :func:`image_experts` as a list of the experts that ran there."""
    return [entry] if isinstance(entry, int) else list(entry)
