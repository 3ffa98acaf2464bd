"""Attention layers: transposed (channel) self- and cross-attention, and the FFT attention of the experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .layers import LayerNorm2d, conv1x1, depthwise, is_channels_last


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      temperature: torch.Tensor) -> torch.Tensor:
    """Transposed attention over channels. q, k, v: [B, C, H, W]; temperature: [heads, 1, 1] -> [B, C, H, W].

    Each head attends between its C/heads channels, with q and k L2-normalised along H*W. Channels-last
    inputs take :func:`_channel_attention_nhwc`, which gives the same result without layout copies.
    """
    if is_channels_last(q):
        return _channel_attention_nhwc(q, k, v, heads, temperature)
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1) * temperature).softmax(dim=-1)
    return (attn @ v).reshape(b, c, h, w)


def _channel_attention_nhwc(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                            temperature: torch.Tensor) -> torch.Tensor:
    """Channels-last form of :func:`channel_attention`, on [B, HW, C] views of the inputs.

    The Gram matrix q^T k is computed for all C channels and normalised afterwards by the outer product of
    the norms (F.normalize's ``x / max(|x|, 1e-12)``); the heads are its diagonal blocks. Entries outside
    the blocks are masked before the softmax, so ``attn @ v`` is one matmul with a block-diagonal matrix.
    """
    b, c, h, w = q.shape
    d = c // heads
    qt, kt, vt = (t.permute(0, 2, 3, 1).reshape(b, h * w, c) for t in (q, k, v))
    # Column dot products (a strided vector_norm over HW is ~7x slower on CPU).
    nq = torch.linalg.vecdot(qt, qt, dim=1).float().sqrt().clamp_min(1e-12).to(qt.dtype)  # [B, C]
    nk = torch.linalg.vecdot(kt, kt, dim=1).float().sqrt().clamp_min(1e-12).to(kt.dtype)
    gram = qt.transpose(1, 2) @ kt  # [B, C, C]
    scale = temperature.view(heads, 1, 1).repeat_interleave(d, dim=0).view(1, c, 1)
    logits = gram / (nq[:, :, None] * nk[:, None, :]) * scale
    if heads > 1:
        block = torch.arange(c, device=q.device) // d
        logits = logits.masked_fill(block[:, None] != block[None, :], float("-inf"))
    attn = logits.softmax(dim=-1)
    out = vt @ attn.transpose(1, 2)  # [B, HW, C]
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


class ChannelAttention(nn.Module):
    """Multi-head transposed self-attention with depthwise-conv QKV (upstream ``Attention``)."""

    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = conv1x1(dim, dim * 3, bias)
        self.qkv_dwconv = depthwise(dim * 3, 3, bias)
        self.project_out = conv1x1(dim, dim, bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W], plus ``residual`` when given."""
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return _project(self.project_out, channel_attention(q, k, v, self.heads, self.temperature), residual)


class ChannelCrossAttention(nn.Module):
    """Transposed cross-attention: queries from x, keys and values from y (upstream ``CrossAttention``)."""

    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.q = conv1x1(dim, dim, bias)
        self.q_dwconv = depthwise(dim, 3, bias)
        self.kv = conv1x1(dim, dim * 2, bias)
        self.kv_dwconv = depthwise(dim * 2, 7, bias)
        self.project_out = conv1x1(dim, dim, bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x, y: [B, C, H, W] -> [B, C, H, W], plus ``residual`` when given."""
        q = self.q_dwconv(self.q(x))
        k, v = self.kv_dwconv(self.kv(y)).chunk(2, dim=1)
        return _project(self.project_out, channel_attention(q, k, v, self.heads, self.temperature), residual)


def _project(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``conv(x) (+ residual)``; the addition is fused into the convolution on the CPU inference path."""
    if residual is None:
        return conv(x)
    if fused.applies(x):
        return fused.conv_binary(x, residual, conv, "add")
    return residual + conv(x)


def patch_fft_product(q: torch.Tensor, k: torch.Tensor, patch: int) -> torch.Tensor:
    """Per non-overlapping p x p patch: ``irfft2(rfft2(q) * rfft2(k))``, in fp32.

    q, k: [B, C, H, W]. Both are zero-padded at the bottom/right to multiples of p; the result is cropped
    back to [B, C, H, W]. The product is plain (no conjugate), i.e. a circular convolution per patch.
    """
    b, c, h, w = q.shape
    ph, pw = -h % patch, -w % patch
    nh, nw = (h + ph) // patch, (w + pw) // patch

    def to_patches(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t.float(), (0, pw, 0, ph))
        return t.reshape(b, c, nh, patch, nw, patch).transpose(3, 4)  # [B, C, nh, nw, p, p]

    out = torch.fft.irfft2(torch.fft.rfft2(to_patches(q)) * torch.fft.rfft2(to_patches(k)), s=(patch, patch))
    out = out.transpose(3, 4).reshape(b, c, nh * patch, nw * patch)
    return out[:, :, :h, :w]


class FFTAttention(nn.Module):
    """The complexity experts' attention at rank r and patch size p, [B, r, H, W] -> [B, r, H, W]."""

    def __init__(self, rank: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.q = conv1x1(rank, rank, bias=False)
        self.q_dwconv = depthwise(rank, 3, bias=True)
        self.kv = conv1x1(rank, rank * 2, bias=False)
        self.kv_dwconv = depthwise(rank * 2, 7, bias=True)
        self.norm = LayerNorm2d(rank)
        self.proj_out = conv1x1(rank, rank, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_dwconv(self.q(x))
        k, v = self.kv_dwconv(self.kv(x)).chunk(2, dim=1)
        out = self.norm(patch_fft_product(q, k, self.patch_size))
        return self.proj_out((out * v).to(v.dtype))
