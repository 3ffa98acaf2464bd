"""Frequency embedding of the bottleneck features, which conditions every router."""

from __future__ import annotations

import torch
from torch import nn


class HighPassConv2d(nn.Module):
    """Depthwise 3x3 conv initialised to the 8-neighbour Laplacian in every channel.

    Upstream means to freeze it but does not (it assigns ``requires_grad_ = False``), so it trains; so does ours.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        laplacian = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]])
        with torch.no_grad():
            self.conv.weight.copy_(laplacian.expand(channels, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FrequencyEmbedding(nn.Module):
    """``mlp(mean_HW(gelu(highpass(x))))``: [B, C, H, W] -> [B, C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.high_conv = nn.Sequential(HighPassConv2d(dim), nn.GELU())
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.high_conv(x).mean(dim=(-2, -1)))
