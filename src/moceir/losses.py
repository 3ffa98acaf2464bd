"""Training losses: L1, the frequency (FFT) L1 loss, and their composition with the balance loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l1", "fft")


def fft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the real and imaginary parts of ``rfft2`` of [B, C, H, W] tensors (upstream's FFTLoss), fp32."""
    p, t = torch.fft.rfft2(pred.float()), torch.fft.rfft2(target.float())
    return F.l1_loss(torch.view_as_real(p), torch.view_as_real(t))


def restoration_loss(pred: torch.Tensor, target: torch.Tensor, balance: torch.Tensor, loss_type: str = "l1",
                     fft_weight: float = 0.1, balance_weight: float = 0.01) -> dict[str, torch.Tensor]:
    """``L1 + fft_weight * FFT (when loss_type is "fft") + balance_weight * balance`` -> parts and "loss"."""
    loss_type = loss_type.lower()
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (case-insensitive), got {loss_type!r}")
    parts = {"l1": F.l1_loss(pred.float(), target.float()), "balance": balance.float()}
    total = parts["l1"] + balance_weight * parts["balance"]
    if loss_type == "fft":
        parts["fft"] = fft_loss(pred, target)
        total = total + fft_weight * parts["fft"]
    parts["loss"] = total
    return parts
