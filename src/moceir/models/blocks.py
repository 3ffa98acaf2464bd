"""Transformer blocks and residual groups of the encoder, the decoder and the refinement stage."""

from __future__ import annotations

import torch
from torch import nn

from .attention import ChannelAttention, ChannelCrossAttention
from .config import MoCEConfig
from .experts import MoCEAdapter
from .layers import FeedForward, LayerNorm2d, conv1x1
from .router import RouterOutput


class EncoderBlock(nn.Module):
    """``x + attn(norm(x))`` then ``x + ffn(norm(x))``; [B, C, H, W] -> same."""

    def __init__(self, dim: int, heads: int, expansion: float, bias: bool = True):
        super().__init__()
        self.norms = nn.ModuleList([LayerNorm2d(dim), LayerNorm2d(dim)])
        self.mixer = ChannelAttention(dim, heads, bias)
        self.ffn = FeedForward(dim, expansion, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixer(self.norms[0](x), residual=x)
        return self.ffn(self.norms[1](x), residual=x)


class DecoderBlock(nn.Module):
    """Shared self-attention branch + MoCE adapter branch, fused by cross-attention, then the FFN.

    ``s = shared(proj0(u)); a = adapter(proj1(u), e, s); x = mixer(a, s) + x; x = x + ffn(norm(x))``
    with ``u = norm(x)``. x: [B, C, H, W], freq_emb: [B, 8d].
    """

    def __init__(self, dim: int, heads: int, freq_dim: int, config: MoCEConfig):
        super().__init__()
        self.norms = nn.ModuleList([LayerNorm2d(dim), LayerNorm2d(dim)])
        self.proj = nn.ModuleList([conv1x1(dim, dim, True), conv1x1(dim, dim, True)])
        self.shared = ChannelAttention(dim, heads, config.bias)
        self.mixer = ChannelCrossAttention(dim, heads, config.bias)
        self.ffn = FeedForward(dim, config.ffn_expansion_factor, config.bias)
        self.adapter = MoCEAdapter(dim, freq_dim, config)

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor, add_noise: bool,
                force: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
        u = self.norms[0](x)
        s = self.shared(self.proj[0](u))
        a, route = self.adapter(self.proj[1](u), freq_emb, s, add_noise, force)
        x = self.mixer(a, s, residual=x)
        return self.ffn(self.norms[1](x), residual=x), route


class EncoderGroup(nn.Module):
    """A sequence of encoder blocks (encoder levels, latent and refinement)."""

    def __init__(self, dim: int, heads: int, num_blocks: int, expansion: float):
        super().__init__()
        self.layers = nn.ModuleList([EncoderBlock(dim, heads, expansion) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class DecoderGroup(nn.Module):
    """A sequence of decoder blocks; returns the features and each block's routing."""

    def __init__(self, dim: int, heads: int, num_blocks: int, freq_dim: int, config: MoCEConfig):
        super().__init__()
        self.layers = nn.ModuleList([DecoderBlock(dim, heads, freq_dim, config) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor, add_noise: bool,
                force: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[RouterOutput]]:
        """force: one [B, k] index tensor per block, or None."""
        routes = []
        for i, layer in enumerate(self.layers):
            x, route = layer(x, freq_emb, add_noise, None if force is None else force[i])
            routes.append(route)
        return x, routes
