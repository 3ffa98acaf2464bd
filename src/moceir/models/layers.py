"""Basic layers of the MoCE-IR U-Net: channel LayerNorm, gated FFN, resampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a [B, C, H, W] tensor whose channels are innermost in memory (C > 1)."""
    return x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1


class _Affine(nn.Module):
    """Holds a LayerNorm's weight and bias under upstream's names (``body.weight``, ``body.bias``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))


def fused_layer_norm_pays(device_type: str, channels: int) -> bool:
    """Whether ``F.layer_norm`` over the channels of a channels-last tensor beats the mean/rsqrt formula.

    On CUDA its kernel is slow for rows shorter than 128 values (benchmarks/layernorm_speed.py, H200, ms per call:
    1.54 against 0.83 at 32 channels x 1024², 0.39 against 0.32 at 64 x 512², but 0.10 against 0.14 at 128 x 256²).
    On the CPU it is the faster one at every size measured.
    """
    return device_type != "cuda" or channels >= 128


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of every pixel, [B, C, H, W] -> [B, C, H, W].

    Normalises along dim 1 directly instead of transposing to [B, HW, C]; the variance is biased, eps 1e-5.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.body = _Affine(channels)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_channels_last(x) and fused_layer_norm_pays(x.device.type, x.shape[1]):
            # Channels-last memory is [B, H, W, C]: one fused layer_norm over its last dim, no copies.
            nhwc = x.permute(0, 2, 3, 1)
            return F.layer_norm(nhwc, (x.shape[1],), self.body.weight, self.body.bias, self.eps).permute(0, 3, 1, 2)
        mu = x.mean(1, keepdim=True)
        xc = x - mu
        var = xc.square().mean(1, keepdim=True)
        w = self.body.weight.view(1, -1, 1, 1)
        b = self.body.bias.view(1, -1, 1, 1)
        return torch.addcmul(b, xc * torch.rsqrt(var + self.eps), w)


def conv1x1(c_in: int, c_out: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=bias)


def depthwise(channels: int, kernel_size: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)


class FeedForward(nn.Module):
    """Gated depthwise-conv FFN: ``project_out(gelu(a) * b)``, with ``a, b = dwconv(project_in(x))``."""

    def __init__(self, dim: int, expansion: float, bias: bool):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = conv1x1(dim, 2 * hidden, bias)
        self.dwconv = depthwise(2 * hidden, 3, bias)
        self.project_out = conv1x1(hidden, dim, bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W], plus ``residual`` when given."""
        if fused.applies(x):
            return self._fused(x, residual)
        a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        out = self.project_out(F.gelu(a) * b)
        return out if residual is None else residual + out

    def _fused(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        # Each half runs as its own 1x1 + depthwise pair, so GELU, the gate and the residual become post-ops.
        h = self.project_out.in_channels
        first, second = slice(0, h), slice(h, 2 * h)
        a = fused.conv(fused.conv(x, self.project_in, channels=first), self.dwconv, "gelu", channels=first)
        b = fused.conv(x, self.project_in, channels=second)
        gated = fused.conv_binary(b, a, self.dwconv, "mul", channels=second)
        if residual is None:
            return fused.conv(gated, self.project_out)
        return fused.conv_binary(gated, residual, self.project_out, "add")


class PatchEmbed(nn.Module):
    """3x3 conv from the image to the first level's width, [B, 3, H, W] -> [B, d, H, W]."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """[B, C, H, W] -> [B, 2C, H/2, W/2]: 3x3 conv to C/2, then PixelUnshuffle(2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """[B, C, H, W] -> [B, C/2, 2H, 2W]: 3x3 conv to 2C, then PixelShuffle(2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
