"""Attention layers: transposed (channel) self- and cross-attention, and the FFT attention of the experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .layers import LayerNorm2d, conv1x1, depthwise, is_channels_last


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, temperature: torch.Tensor,
                      off_head: torch.Tensor | None = None) -> torch.Tensor:
    """Transposed attention over channels. q, k, v: [B, C, H, W]; temperature: [heads, 1, 1] -> [B, C, H, W].

    Each head attends between its C/heads channels, with q and k L2-normalised along H*W. Channels-last
    inputs take :func:`_channel_attention_nhwc`, which gives the same result without layout copies;
    ``off_head`` ([C, C] bool, :func:`off_head_mask`) spares it building its mask on every call.
    """
    if is_channels_last(q):
        return _channel_attention_nhwc(q, k, v, heads, temperature, off_head)
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1) * temperature).softmax(dim=-1)
    return (attn @ v).reshape(b, c, h, w)


def off_head_mask(channels: int, heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[C, C] bool: True where channels i and j belong to different heads (the blocks off the diagonal)."""
    block = torch.arange(channels, device=device) // (channels // heads)
    return block[:, None] != block[None, :]


def _channel_attention_nhwc(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                            temperature: torch.Tensor, off_head: torch.Tensor | None = None) -> torch.Tensor:
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
    scale = temperature.view(heads, 1, 1).expand(heads, d, 1).reshape(1, c, 1)
    logits = gram / (nq[:, :, None] * nk[:, None, :]) * scale
    if heads > 1:
        logits = logits.masked_fill(off_head_mask(c, heads, q.device) if off_head is None else off_head,
                                    float("-inf"))
    attn = logits.softmax(dim=-1)
    out = vt @ attn.transpose(1, 2)  # [B, HW, C]
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


class ChannelAttention(nn.Module):
    """Multi-head transposed self-attention with depthwise-conv QKV (upstream ``Attention``)."""

    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.register_buffer("off_head", off_head_mask(dim, heads), persistent=False)
        self.qkv = conv1x1(dim, dim * 3, bias)
        self.qkv_dwconv = depthwise(dim * 3, 3, bias)
        self.project_out = conv1x1(dim, dim, bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W], plus ``residual`` when given."""
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return _project(self.project_out, channel_attention(q, k, v, self.heads, self.temperature, self.off_head),
                        residual)


class ChannelCrossAttention(nn.Module):
    """Transposed cross-attention: queries from x, keys and values from y (upstream ``CrossAttention``)."""

    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.register_buffer("off_head", off_head_mask(dim, heads), persistent=False)
        self.q = conv1x1(dim, dim, bias)
        self.q_dwconv = depthwise(dim, 3, bias)
        self.kv = conv1x1(dim, dim * 2, bias)
        self.kv_dwconv = depthwise(dim * 2, 7, bias)
        self.project_out = conv1x1(dim, dim, bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x, y: [B, C, H, W] -> [B, C, H, W], plus ``residual`` when given."""
        q = self.q_dwconv(self.q(x))
        k, v = self.kv_dwconv(self.kv(y)).chunk(2, dim=1)
        return _project(self.project_out, channel_attention(q, k, v, self.heads, self.temperature, self.off_head),
                        residual)


def _project(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``conv(x) (+ residual)``; the addition is fused into the convolution on the CPU inference path."""
    if residual is None:
        return conv(x)
    if fused.applies(x):
        return fused.conv_binary(x, residual, conv, "add")
    return residual + conv(x)


def patch_fft_product(q: torch.Tensor, k: torch.Tensor, patch: int, impl: str = "fft",
                      dft: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Per non-overlapping p x p patch: ``irfft2(rfft2(q) * rfft2(k))``, in fp32.

    q, k: [B, C, H, W]. Both are zero-padded at the bottom/right to multiples of p; the result is cropped
    back to [B, C, H, W]. The product is plain (no conjugate), i.e. a circular convolution per patch.
    ``impl`` picks how it is computed (see :data:`PATCH_PRODUCTS`); all give the same result to fp32 rounding.
    ``dft``: the "matmul" path's :func:`real_dft_matrices`, when the caller holds them (as FFTAttention does).
    """
    return PATCH_PRODUCTS[impl](q, k, patch, dft)


def _pad_to(t: torch.Tensor, patch: int) -> tuple[torch.Tensor, int, int]:
    """(fp32 copy of t: [B, C, H, W] zero-padded at the bottom/right to [B, C, nh * p, nw * p], nh, nw).

    nh = ceil(H / p) is written so that the padded size is literally ``nh * p``: under symbolic shapes
    (torch.export, torch.compile with dynamic H and W) the reshapes into patches are then trivially valid; the
    modulo form ``H + (-H % p)`` made tracing one FFTAttention 2.5 times slower.
    """
    h, w = t.shape[-2:]
    nh, nw = (h + patch - 1) // patch, (w + patch - 1) // patch
    return F.pad(t.float(), (0, nw * patch - w, 0, nh * patch - h)), nh, nw


def _product_fft(q: torch.Tensor, k: torch.Tensor, patch: int, dft: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    b, c, h, w = q.shape
    (qp, nh, nw), (kp, _, _) = _pad_to(q, patch), _pad_to(k, patch)

    def to_patches(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, c, nh, patch, nw, patch).transpose(3, 4)  # [B, C, nh, nw, p, p]

    out = torch.fft.irfft2(torch.fft.rfft2(to_patches(qp)) * torch.fft.rfft2(to_patches(kp)), s=(patch, patch))
    out = out.transpose(3, 4).reshape(b, c, nh * patch, nw * patch)
    return out[:, :, :h, :w]


_DFT_CACHE: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}


def real_dft_matrices(patch: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """The real matrices of :func:`_product_matmul` for patch size p, built in float64 once per p/dtype/device.

    With m = p/2 + 1 width frequencies, C[f, n] = cos(2 pi f n / p) and S = sin(...):
    - ``w_cos``, ``w_sin`` [p, m]: the width rfft, ``Re = x @ w_cos``, ``Im = x @ w_sin`` (= -sum x sin);
    - ``h_fwd`` [2p, 2p]: the height DFT of a complex column stacked as [Re; Im]: [[C, S], [-S, C]];
    - ``h_inv`` [2p, 2p]: its inverse, [[C, -S], [S, C]] / p;
    - ``w_inv`` [2m, p]: the width irfft from [Re | Im] (weights 1, 2, ..., 2, 1 over p; the imaginary parts of
      frequencies 0 and p/2 are ignored, as ``irfft`` does).
    Cached here for eager callers; FFTAttention holds its own copies as non-persistent buffers (not in the
    state_dict), which follow the module's device and which tracing (torch.export, torch.compile) sees as constants.
    """
    key = (patch, dtype, torch.device(device))
    if key not in _DFT_CACHE:
        p, m = patch, patch // 2 + 1
        n = torch.arange(p, dtype=torch.float64)
        ang_w = 2 * torch.pi * n[:, None] * torch.arange(m, dtype=torch.float64)[None, :] / p  # [p, m]
        ang_h = 2 * torch.pi * n[:, None] * n[None, :] / p  # [p, p]
        cos_h, sin_h = ang_h.cos(), ang_h.sin()
        weight = torch.full((m, 1), 2.0, dtype=torch.float64)
        weight[0] = weight[-1] = 1.0
        mats = (
            ang_w.cos(), -ang_w.sin(),
            torch.cat([torch.cat([cos_h, sin_h], 1), torch.cat([-sin_h, cos_h], 1)]),
            torch.cat([torch.cat([cos_h, -sin_h], 1), torch.cat([sin_h, cos_h], 1)]) / p,
            torch.cat([weight * ang_w.T.cos(), -weight * ang_w.T.sin()]) / p,
        )
        _DFT_CACHE[key] = tuple(t.to(device=device, dtype=dtype).contiguous() for t in mats)
    return _DFT_CACHE[key]


def _product_matmul(q: torch.Tensor, k: torch.Tensor, patch: int,
                    dft: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """Real-valued :func:`patch_fft_product`: separable real DFTs as matrix products, no complex tensors.

    The width rfft is one GEMM on each row of each patch ([.., p] @ [p, m]); its real and imaginary parts are
    stacked above the patch rows, so the height DFT is one [2p, 2p] matrix times [G, 2p, nw * m] per row of
    patches. No transposes of the patches are needed; the product of the spectra is the complex product written
    out in reals. Autocast is suspended: the transform runs in fp32 as the "fft" path does.
    """
    if torch.is_autocast_enabled(q.device.type):
        with torch.autocast(q.device.type, enabled=False):
            return _product_matmul(q, k, patch, dft)
    b, c, h, w = q.shape
    p, m = patch, patch // 2 + 1
    if dft is None:
        dft = real_dft_matrices(p, torch.float32, q.device)
    w_cos, w_sin, h_fwd, h_inv, w_inv = (t.float() for t in dft)
    (qp, nh, nw), (kp, _, _) = _pad_to(q, p), _pad_to(k, p)
    rows = b * c * nh

    def spectrum(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = t.reshape(rows, p, nw, p)  # [G, p rows of a patch, nw patches, p columns]
        re_im = torch.stack([x @ w_cos, x @ w_sin], 1).reshape(rows, 2 * p, nw * m)
        z = torch.matmul(h_fwd, re_im).reshape(rows, 2, p, nw, m)
        return z[:, 0], z[:, 1]

    (qr, qi), (kr, ki) = spectrum(qp), spectrum(kp)
    prod = torch.stack([qr * kr - qi * ki, qr * ki + qi * kr], 1).reshape(rows, 2 * p, nw * m)
    u = torch.matmul(h_inv, prod).reshape(rows, 2, p, nw, m)
    out = torch.cat([u[:, 0], u[:, 1]], -1) @ w_inv  # [G, p, nw, p]
    return out.reshape(b, c, nh * p, nw * p)[:, :, :h, :w]


DFT_BUFFERS = ("dft_w_cos", "dft_w_sin", "dft_h_fwd", "dft_h_inv", "dft_w_inv")  # FFTAttention's buffer names
# fft_impl name -> implementation of patch_fft_product (MoCEConfig.fft_impl, FFT_IMPLS in config.py).
PATCH_PRODUCTS = {"fft": _product_fft, "matmul": _product_matmul}


class FFTAttention(nn.Module):
    """The complexity experts' attention at rank r and patch size p, [B, r, H, W] -> [B, r, H, W]."""

    def __init__(self, rank: int, patch_size: int, fft_impl: str = "fft"):
        super().__init__()
        self.patch_size = patch_size
        self.fft_impl = fft_impl  # a key of PATCH_PRODUCTS; MoCEIR sets it from MoCEConfig.fft_impl
        for name, matrix in zip(DFT_BUFFERS, real_dft_matrices(patch_size)):
            self.register_buffer(name, matrix.clone(), persistent=False)  # used by fft_impl="matmul" only
        self.q = conv1x1(rank, rank, bias=False)
        self.q_dwconv = depthwise(rank, 3, bias=True)
        self.kv = conv1x1(rank, rank * 2, bias=False)
        self.kv_dwconv = depthwise(rank * 2, 7, bias=True)
        self.norm = LayerNorm2d(rank)
        self.proj_out = conv1x1(rank, rank, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_dwconv(self.q(x))
        k, v = self.kv_dwconv(self.kv(x)).chunk(2, dim=1)
        dft = tuple(getattr(self, name) for name in DFT_BUFFERS)
        out = self.norm(patch_fft_product(q, k, self.patch_size, self.fft_impl, dft))
        return self.proj_out((out * v).to(v.dtype))
