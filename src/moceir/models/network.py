"""The MoCE-IR network: a 4-level U-Net whose decoder blocks hold mixtures of complexity experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import PATCH_PRODUCTS, FFTAttention
from .blocks import DecoderGroup, EncoderGroup
from .config import MoCEConfig
from .experts import DISPATCH_MODES, MoCEAdapter
from .frequency import FrequencyEmbedding
from .layers import Downsample, PatchEmbed, Upsample, conv1x1
from .router import RouterOutput


@dataclass
class MoCEOutput:
    """What one forward pass computes.

    image: [B, 3, H, W] restored image; balance_loss: scalar, mean of the MoE layers' balance losses
    (0 in eval); routing: one RouterOutput per MoE layer in module order (dec level 0 first).
    """

    image: torch.Tensor
    balance_loss: torch.Tensor
    routing: list[RouterOutput]

    @property
    def expert_indices(self) -> torch.Tensor:
        """Chosen experts per MoE layer and image: [layers, B, k]."""
        return torch.stack([r.indices for r in self.routing])

    @property
    def experts(self) -> torch.Tensor:
        """Top-1 expert per MoE layer and image: [layers, B]."""
        return self.expert_indices[..., 0]


class MoCEIR(nn.Module):
    """MoCE-IR (Zamfir et al., CVPR 2025). State_dict names are upstream's ``MoCEIR``'s.

    ``model(x)`` with x: [B, 3, H, W] in [0, 1], H and W multiples of ``config.size_multiple``, returns the
    restored image in eval mode and a :class:`MoCEOutput` in training mode (or with ``return_aux=True``).
    """

    def __init__(self, config: MoCEConfig):
        super().__init__()
        self.config = config
        self.eval_router_noise = config.eval_router_noise
        widths, heads, c = config.widths, config.heads, config
        levels = config.levels
        self.patch_embed = PatchEmbed(c.inp_channels, c.dim)
        self.freq_embed = FrequencyEmbedding(widths[-1])
        self.enc = nn.ModuleList([
            nn.ModuleList([EncoderGroup(widths[i], heads[i], c.num_blocks[i], c.ffn_expansion_factor),
                           Downsample(widths[i])])
            for i in range(levels - 1)
        ])
        self.latent = EncoderGroup(widths[-1], heads[-1], c.num_blocks[-1], c.ffn_expansion_factor)
        self.dec = nn.ModuleList()
        for i in range(levels - 1):  # deepest first
            lvl = levels - 2 - i
            self.dec.append(nn.ModuleList([
                Upsample(widths[lvl + 1]),
                conv1x1(2 * widths[lvl], widths[lvl], c.bias),
                DecoderGroup(widths[lvl], heads[lvl], c.num_dec_blocks[lvl], widths[-1], c),
            ]))
        self.refinement = EncoderGroup(c.dim, heads[0], c.num_refinement_blocks, c.ffn_expansion_factor)
        self.output = nn.Conv2d(c.dim, c.out_channels, 3, padding=1, bias=c.bias)
        self.set_fft_impl(c.fft_impl)  # the experts build their FFTAttention without the config

    @property
    def adapters(self) -> list[MoCEAdapter]:
        return [m for m in self.modules() if isinstance(m, MoCEAdapter)]

    def set_fft_impl(self, impl: str) -> "MoCEIR":
        """Compute the experts' patch FFT product as ``impl`` (a key of attention.PATCH_PRODUCTS: "fft", "matmul").

        Only the kernels change: ``self.config`` (and so every file saved from this network) keeps its own value.
        """
        if impl not in PATCH_PRODUCTS:
            raise ValueError(f"fft_impl must be one of {tuple(PATCH_PRODUCTS)}, got {impl!r}")
        for m in self.modules():
            if isinstance(m, FFTAttention):
                m.fft_impl = impl
        return self

    def set_dispatch(self, mode: str) -> "MoCEIR":
        """Choose how images reach their experts: "auto", "dense", "sparse" or "conditional" (see MoCEAdapter)."""
        if mode not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {mode!r}")
        for adapter in self.adapters:
            adapter.dispatch = mode
        return self

    @property
    def num_moe_layers(self) -> int:
        return sum(self.config.num_dec_blocks)

    def forward(self, x: torch.Tensor, return_aux: bool | None = None,
                experts: torch.Tensor | None = None) -> torch.Tensor | MoCEOutput:
        """x: [B, 3, H, W]. ``experts`` ([layers, B] or [layers, B, k]) forces each MoE layer's choice."""
        if return_aux is None:
            return_aux = self.training
        if x.dim() != 4 or x.shape[1] != self.config.inp_channels:
            raise ValueError(f"input must be [B, {self.config.inp_channels}, H, W], got {list(x.shape)}; "
                             "moceir.restore takes images of other layouts")
        m = self.config.size_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"input H and W must be multiples of {m}, got {tuple(x.shape[-2:])}; "
                             "use moceir.inference.pad_to_multiple or moceir.restore for any size")
        add_noise = self.training or self.eval_router_noise
        if self.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # after model.to(memory_format=channels_last)
        f = self.patch_embed(x)
        skips = []
        for group, down in self.enc:
            f = group(f)
            skips.append(f)
            f = down(f)
        f = self.latent(f)
        e = self.freq_embed(f)
        routing: list[RouterOutput] = []
        for up, fuse, group in self.dec:
            f = fuse(torch.cat([up(f), skips.pop()], dim=1))
            n = len(group.layers)
            force = None if experts is None else list(experts[len(routing):len(routing) + n])
            f, routes = group(f, e, add_noise, force)
            routing.extend(routes)
        image = self.output(self.refinement(f)) + x
        if not return_aux:
            return image
        balance = torch.stack([r.balance_loss for r in routing]).mean()
        return MoCEOutput(image=image, balance_loss=balance, routing=routing)
