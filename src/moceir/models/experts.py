"""Complexity experts and the mixture-of-experts adapter that dispatches images to them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .attention import FFTAttention
from .config import MoCEConfig
from .layers import conv1x1
from .router import Router, RouterOutput

DISPATCH_MODES = ("auto", "dense", "sparse", "conditional")


class ComplexityExpert(nn.Module):
    """Low-rank FFT-attention expert: ``proj2(body(proj0(x)) * silu(proj1(s))) + x``.

    x, s: [B, C, H, W] (s is the shared branch) -> [B, C, H, W]. Upstream repeats this ``depth`` times on
    the same input, which gives the same result as running it once, so it runs once here.
    """

    def __init__(self, dim: int, rank: int, patch_size: int):
        super().__init__()
        self.proj = nn.ModuleList([conv1x1(dim, rank, False), conv1x1(dim, rank, False), conv1x1(rank, dim, False)])
        self.body = FFTAttention(rank, patch_size)

    def forward(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        if fused.applies(x) and fused.applies(shared):
            gate = fused.conv(shared, self.proj[1], "swish")
            return fused.conv_binary(self.body(self.proj[0](x)) * gate, x, self.proj[2], "add")
        return self.proj[2](self.body(self.proj[0](x)) * F.silu(self.proj[1](shared))) + x


class MoCEAdapter(nn.Module):
    """Mixture of complexity experts (upstream ``AdapterLayer``): ``proj_out(sum_topk gate * expert(x, s))``.

    Every image is routed to its own experts at any batch size. Two equivalent dispatch paths:
    - "dense": every expert runs on the whole batch and a [B, E] gate matrix selects; no host
      synchronisation and static shapes (CUDA graphs / torch.compile friendly);
    - "sparse": each expert runs only on the images routed to it (less arithmetic, needs the routing
      on the host). "auto" picks dense on CUDA and sparse elsewhere.
    A third, "conditional", is dense with each expert behind ``torch.cond(some image chose it)``: in an exported
    graph (an ONNX ``If`` per expert) only the chosen experts run, with the dense path's per-image gating. Run
    eagerly, the same branches are plain Python ``if``s (eager ``torch.cond`` compiles its branches on every call).
    """

    def __init__(self, dim: int, freq_dim: int, config: MoCEConfig):
        super().__init__()
        ranks = config.expert_ranks(dim)
        patches = config.expert_patch_sizes()
        # Each expert sits in a one-element ModuleList so that its state_dict path is upstream's `experts.i.0`.
        self.experts = nn.ModuleList([nn.ModuleList([ComplexityExpert(dim, r, p)]) for r, p in zip(ranks, patches)])
        self.proj_out = conv1x1(dim, dim, False)
        complexity = torch.tensor([sum(p.numel() for p in e.parameters()) for e in self.experts])
        self.routing = Router(dim, freq_dim, config.num_exp_blocks, config.topk, complexity,
                              config.with_complexity, config.complexity_scale)
        self.dispatch = "auto"
        self.bypass = False  # ablation: every expert is the identity (its branch zero, the residual kept)

    def expert(self, i: int) -> ComplexityExpert:
        return self.experts[i][0]

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor, shared: torch.Tensor, add_noise: bool,
                force: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """x, shared: [B, C, H, W]; freq_emb: [B, F]; force: [B, k] or None -> ([B, C, H, W], routing)."""
        route = self.routing(x, freq_emb, add_noise, force)
        if self.bypass:  # expert(x, s) = x for every expert: the gated sum is x times the summed gates
            return self.proj_out(x * route.gates.sum(1).view(-1, 1, 1, 1).to(x.dtype)), route
        mode = self.dispatch
        if mode == "auto":
            mode = "dense" if x.is_cuda else "sparse"
        combine = {"dense": self._dense, "sparse": self._sparse, "conditional": self._conditional}[mode]
        return self.proj_out(combine(x, shared, route)), route

    @staticmethod
    def _gate_matrix(route: RouterOutput) -> torch.Tensor:
        """[B, E]: each image's gate for each expert, 0 where the expert was not chosen."""
        return route.gates.new_zeros(route.logits.shape).scatter(1, route.indices, route.gates)

    def _dense(self, x: torch.Tensor, shared: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """``sum_i w_i * expert_i(x, s)`` for every image, with the experts' 1x1 projections merged.

        Each expert is ``proj2(body(proj0(x)) * silu(proj1(s))) + x`` with bias-free projections, so the gated sum is
        ``x * sum_i w_i + proj2_all(cat_i(w_i * body_i(...) * silu(...)))``: proj0 and proj1 of all experts run as
        one convolution each (x and s are read once, not once per expert) and proj2 as one over the concatenated
        ranks, instead of four full-width outputs weighted and summed. Same result to float rounding.
        """
        weights = self._gate_matrix(route).to(x.dtype)  # [B, E]
        experts = [self.expert(i) for i in range(len(self.experts))]
        ranks = [e.proj[0].out_channels for e in experts]
        low = F.conv2d(x, torch.cat([e.proj[0].weight for e in experts]))  # [B, sum(ranks), H, W]
        gate = F.silu(F.conv2d(shared, torch.cat([e.proj[1].weight for e in experts])))
        parts = [e.body(xi) * gi * weights[:, i].view(-1, 1, 1, 1)
                 for i, (e, xi, gi) in enumerate(zip(experts, low.split(ranks, 1), gate.split(ranks, 1)))]
        up = F.conv2d(torch.cat(parts, 1), torch.cat([e.proj[2].weight for e in experts], 1))
        return up + x * weights.sum(1).view(-1, 1, 1, 1)

    def _conditional(self, x: torch.Tensor, shared: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        weights = self._gate_matrix(route)
        out = torch.zeros_like(x)
        traced = _tracing()
        for i in range(len(self.experts)):
            # Flat branch outputs: torch.cond cannot prove symbolic 4-D strides of the two branches equal.
            def run(x, s, w, expert=self.expert(i)):
                return (expert(x, s) * w.view(-1, 1, 1, 1).to(x.dtype)).reshape(-1)

            def skip(x, s, w):
                return torch.zeros_like(x).reshape(-1)

            chosen = weights[:, i].sum() > 0  # gates are positive; `amax() > 0` has no ONNX translation
            if traced:
                out = out + torch.cond(chosen, run, skip, (x, shared, weights[:, i])).view(x.shape)
            elif chosen:  # eager: the same branches without torch.cond, which compiles them on every call
                out = out + run(x, shared, weights[:, i]).view(x.shape)
        return out

    def _sparse(self, x: torch.Tensor, shared: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        out = torch.zeros_like(x)
        for i in range(len(self.experts)):
            rows, slots = (route.indices == i).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            gate = route.gates[rows, slots].view(-1, 1, 1, 1).to(x.dtype)
            if rows.numel() == len(x) and route.indices.shape[1] == 1:  # the whole batch (rows = 0..B-1, sorted)
                return self.expert(i)(x, shared) * gate
            out = out.index_add(0, rows, self.expert(i)(x[rows], shared[rows]) * gate)
        return out


def _tracing() -> bool:
    """Under torch.compile or torch.export (a torch without these queries is taken as eager)."""
    return any(getattr(torch.compiler, query, lambda: False)() for query in ("is_compiling", "is_exporting"))


def set_expert_bypass(model: nn.Module, bypass: bool = True) -> nn.Module:
    """Replace every complexity expert by the identity (``bypass=True``) or restore them; returns ``model``.

    The routing still runs and is reported. This measures what the experts contribute to the output.
    """
    for module in model.modules():
        if isinstance(module, MoCEAdapter):
            module.bypass = bypass
    return model
