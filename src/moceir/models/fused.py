"""oneDNN-fused convolutions for CPU inference.

On the CPU most of the network's time outside the convolutions goes to elementwise passes over full-resolution
feature maps: the FFN's GELU and gate, and the residual additions. oneDNN applies such operations as
"post-ops" inside the convolution, while its output is still in cache. PyTorch exposes this through
``torch.ops.mkldnn._convolution_pointwise`` (what inductor emits for CPU graphs). That op has no autograd, so
the fused path is taken only when gradients are off, on float32 channels-last CPU tensors; everything else
takes the reference path, which it matches to float rounding (``tests/test_fused.py``).

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
    """True when ``x`` ([B, C, H, W]) may take the fused path: CPU, float32, channels-last, no autograd."""
    return (_enabled and _OPS is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last))


def _geometry(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv(x: torch.Tensor, conv: nn.Conv2d, unary: str = "none", channels: slice | None = None) -> torch.Tensor:
    """``unary(conv(x))`` in one oneDNN call; unary is "none", "gelu" (erf) or "swish" (SiLU).

    ``channels`` selects a slice of the output channels (for a depthwise conv, of the input channels too).
    """
    weight, bias = _weights(conv, channels)
    padding, stride, dilation, groups = _geometry(conv)
    if channels is not None and groups > 1:
        groups = weight.shape[0]
    algorithm = "none" if unary == "gelu" else None
    return _OPS.default(x, weight, bias, padding, stride, dilation, groups, unary, [], algorithm)


def conv_binary(x: torch.Tensor, other: torch.Tensor, conv: nn.Conv2d, binary: str,
                channels: slice | None = None) -> torch.Tensor:
    """``conv(x) <binary> other`` in one oneDNN call; binary is "add" or "mul"; other has conv's output shape."""
    weight, bias = _weights(conv, channels)
    padding, stride, dilation, groups = _geometry(conv)
    if channels is not None and groups > 1:
        groups = weight.shape[0]
    return _OPS.binary(x, other, weight, bias, padding, stride, dilation, groups, binary, None, None, [], None)


def _weights(conv: nn.Conv2d, channels: slice | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if channels is None:
        return conv.weight, conv.bias
    bias = None if conv.bias is None else conv.bias[channels]
    return conv.weight[channels], bias
