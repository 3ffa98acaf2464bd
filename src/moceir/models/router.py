"""The complexity-aware router and its balance losses (importance + noisy-top-k load)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def importance_loss(probs: torch.Tensor, complexity: torch.Tensor | None = None) -> torch.Tensor:
    """Squared coefficient of variation of the summed router probabilities.

    probs: [B, E] softmax of the clean logits; complexity: [E] or None (no complexity bias) -> scalar.
    """
    importance = probs.sum(dim=0)
    if complexity is not None:
        importance = importance * complexity
    return (importance.std() / (importance.mean() + 1e-8)) ** 2


def load_loss(logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: float, k: int) -> torch.Tensor:
    """Noisy-top-k load estimate (Shazeer et al.): squared CV of each expert's mean P(selected).

    logits, noisy_logits: [B, E] -> scalar. The threshold is the noisy logit ranked k-th in each row.
    """
    kth = noisy_logits.topk(k, dim=-1).indices[:, -1:]
    threshold = noisy_logits.gather(1, kth)
    z = (threshold - logits) / noise_std
    p_selected = 1.0 - 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))  # 1 - Phi(z)
    p_mean = p_selected.mean(dim=0)
    return (p_mean.std() / (p_mean.mean() + 1e-8)) ** 2


@dataclass
class RouterOutput:
    """One MoE layer's routing. indices, gates: [B, k]; logits: [B, E]; balance_loss: scalar (0 in eval)."""

    indices: torch.Tensor
    gates: torch.Tensor
    logits: torch.Tensor
    balance_loss: torch.Tensor


class Router(nn.Module):
    """Routes each image to its top-k experts from pooled features and the frequency embedding.

    The complexity buffer (expert parameter counts scaled by their max or min) biases the importance
    loss toward cheap experts.
    """

    def __init__(self, dim: int, freq_dim: int, num_experts: int, k: int, complexity: torch.Tensor,
                 use_complexity_bias: bool, complexity_scale: str = "max"):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, num_experts, bias=False))
        self.freq_gate = nn.Linear(freq_dim, num_experts, bias=False)
        complexity = complexity.float()
        scale = complexity.max() if complexity_scale == "max" else complexity.min()
        self.register_buffer("complexity", complexity / scale)
        self.k = k
        self.noise_std = 1.0 / num_experts
        self.use_complexity_bias = use_complexity_bias

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor, add_noise: bool,
                force: torch.Tensor | None = None) -> RouterOutput:
        """x: [B, C, H, W]; freq_emb: [B, F]. Noise N(0, (1/E)^2) is added when ``add_noise``.

        ``force`` ([B, k] expert indices) overrides the choice, e.g. to route all tiles of an image alike.
        """
        logits = self.gate(x) + self.freq_gate(freq_emb)
        noisy = logits + torch.randn_like(logits) * self.noise_std if add_noise else logits
        probs = noisy.softmax(dim=-1)
        if force is None:
            gates, indices = probs.topk(self.k, dim=-1)
        else:
            indices = force.to(device=probs.device, dtype=torch.long).view(len(probs), -1)
            gates = probs.gather(1, indices)
        if self.training:
            complexity = self.complexity if self.use_complexity_bias else None
            balance = 0.5 * importance_loss(logits.softmax(dim=-1), complexity) \
                + 0.5 * load_loss(logits, noisy, self.noise_std, self.k)
        else:
            balance = logits.new_zeros(())
        return RouterOutput(indices=indices, gates=gates, logits=logits, balance_loss=balance)
