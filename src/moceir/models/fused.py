"""oneDNN-fused convolutions for CPU inference.

On the CPU most of the network's time outside the convolutions goes to elementwise passes over full-resolution
feature maps: the FFN's GELU and gate, and the residual additions. oneDNN applies such operations as
"post-ops" inside the convolution, while its output is still in cache. PyTorch exposes this through
``torch.ops.mkldnn._convolution_pointwise`` (what inductor emits for CPU graphs). That op has no autograd, so
the fused path is taken only when gradients are off, on float32 channels-last CPU tensors of at least
``MIN_PIXELS``; everything else takes the reference path, which it matches to float rounding
(``tests/test_fused.py``). In torch 2.13 a depthwise convolution's "mul" runs as an in-place multiply right after
the convolution rather than as a true post-op: it saves an allocation, not a pass.

Measured effect and memory cost: docs/performance.md ("What made the CPU faster").

``MOCEIR_NO_CPU_FUSION=1`` or :func:`set_enabled` turns the fused path off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

_OPS = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None
_enabled = os.environ.get("MOCEIR_NO_CPU_FUSION", "") in ("", "0")
# Below about 64x64 pixels per feature map the fused calls cost more than they save (benchmarks/fusion_sizes.py,
# per FFN: 0.54-0.74x the reference time at 256x256, 0.86-0.95x at 64x64, 0.97-1.03x at 32x32, 1.10x at 16x16).
MIN_PIXELS = 64 * 64


def set_enabled(enabled: bool) -> None:
    """Turn the fused CPU inference path on or off for the whole process."""
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the reference path inside the ``with`` block (for comparisons and tests)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def applies(x: torch.Tensor) -> bool:
    """True when ``x`` ([B, C, H, W]) may take the fused path: CPU, float32, channels-last, no autograd, and
    at least ``MIN_PIXELS`` pixels."""
    return (_enabled and _OPS is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.dim() == 4 and x.shape[2] * x.shape[3] >= MIN_PIXELS
            and x.is_contiguous(memory_format=torch.channels_last))


def conv(x: torch.Tensor, layer: nn.Conv2d, unary: str = "none", channels: slice | None = None) -> torch.Tensor:
    """``unary(layer(x))`` in one oneDNN call; unary is "none", "gelu" (erf) or "swish" (SiLU).

    ``channels`` selects a slice of the output channels (for a depthwise conv, of the input channels too).
    """
    algorithm = "none" if unary == "gelu" else None
    return _OPS.default(x, *_conv_args(layer, channels), unary, [], algorithm)


def conv_binary(x: torch.Tensor, other: torch.Tensor, layer: nn.Conv2d, binary: str,
                channels: slice | None = None) -> torch.Tensor:
    """``layer(x) <binary> other`` in one oneDNN call; binary is "add" or "mul"; other has the output's shape."""
    return _OPS.binary(x, other, *_conv_args(layer, channels), binary, None, None, [], None)


def _conv_args(layer: nn.Conv2d, channels: slice | None) -> tuple:
    """(weight, bias, padding, stride, dilation, groups) of ``layer``, restricted to ``channels``."""
    weight, bias, groups = layer.weight, layer.bias, layer.groups
    if channels is not None:
        weight, bias = weight[channels], None if bias is None else bias[channels]
        if groups > 1:  # depthwise: one group per kept channel
            groups = weight.shape[0]
    return weight, bias, list(layer.padding), list(layer.stride), list(layer.dilation), groups
