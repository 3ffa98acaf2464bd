"""Model configuration: a frozen dataclass, named presets and a registry.

Field names follow upstream's options (``dim``, ``num_blocks``, ``num_dec_blocks``, ``heads``,
``num_refinement_blocks``, ``num_exp_blocks``, ``topk``, ``latent_dim``, ``rank_type``, ...) so that
the paper's commands map one-to-one.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Callable

MAX_RANK = 2**16  # channels of a level or an expert; upstream's widest level has a few hundred
MAX_EXPERTS = 64  # complexity experts per MoE layer (upstream: 4)
RANK_TYPES = ("spread", "constant", "lin", "double", "exp", "fact")
COMPLEXITY_SCALES = ("max", "min")
# How the experts' per-patch FFT product is computed (moceir.models.attention.PATCH_PRODUCTS): "fft" with
# torch.fft, "matmul" with real DFT matrices (no complex tensors: exportable to ONNX). Same result to fp32 rounding.
FFT_IMPLS = ("fft", "matmul")
# Smallest value of each integer field, and of each entry of each integer-list field (checked in __post_init__).
INT_MINIMUMS = {"dim": 1, "inp_channels": 1, "out_channels": 1, "num_refinement_blocks": 0, "num_exp_blocks": 1,
                "topk": 1, "latent_dim": 1}
INT_LIST_MINIMUMS = {"num_blocks": 0, "num_dec_blocks": 1, "heads": 1, "stage_depth": 0}
BOOL_FIELDS = ("bias", "with_complexity", "eval_router_noise")


def _integer(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int (numpy integers too; not bools, floats or strings) of at least ``minimum``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {v}")
    return v


@dataclass(frozen=True)
class MoCEConfig:
    dim: int = 32  # width d of the first level; levels are d, 2d, 4d, 8d
    num_blocks: tuple[int, ...] = (4, 6, 6, 8)  # encoder blocks per level, last entry = latent blocks
    num_dec_blocks: tuple[int, ...] = (2, 4, 4)  # decoder blocks, listed from the shallowest level
    heads: tuple[int, ...] = (1, 2, 4, 8)  # attention heads per level
    num_refinement_blocks: int = 4
    ffn_expansion_factor: float = 2.0
    bias: bool = False  # bias of the decoder attention/FFN, skip fusion and output conv
    inp_channels: int = 3
    out_channels: int = 3
    num_exp_blocks: int = 4  # complexity experts per MoE layer
    topk: int = 1
    rank_type: str = "spread"  # "spread": expert ranks C/8, C/4, C/2, C
    latent_dim: int = 2  # expert rank for the non-"spread" rank types (upstream's `rank`)
    depth_type: str = "constant"  # kept for checkpoint compatibility; depth never changes the output
    stage_depth: tuple[int, ...] = (1, 1, 1)
    with_complexity: bool = True  # weight the importance loss by expert complexity (training only)
    complexity_scale: str = "max"
    eval_router_noise: bool = False  # upstream quirk: router noise also in eval (set True to reproduce it)
    fft_impl: str = "fft"  # experts' patch FFT product: "fft" or "matmul" (FFT_IMPLS); no effect on the weights

    def __post_init__(self) -> None:
        for name, minimum in INT_MINIMUMS.items():
            object.__setattr__(self, name, _integer(name, getattr(self, name), minimum))
        for name, minimum in INT_LIST_MINIMUMS.items():
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
                raise ValueError(f"{name} must be a list of integers, got {values!r}")
            object.__setattr__(self, name, tuple(_integer(f"{name}[{i}]", v, minimum) for i, v in enumerate(values)))
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        factor = self.ffn_expansion_factor
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not 0 < factor < math.inf:
            raise ValueError(f"ffn_expansion_factor must be a positive finite number, got {factor!r}")
        if not isinstance(self.depth_type, str):
            raise ValueError(f"depth_type must be a string, got {self.depth_type!r}")
        levels = len(self.num_blocks)
        if levels < 2:
            raise ValueError(f"num_blocks needs at least 2 entries (encoder levels + latent), got {self.num_blocks}")
        if len(self.num_dec_blocks) != levels - 1:
            raise ValueError(f"num_dec_blocks needs {levels - 1} entries for num_blocks={self.num_blocks}, "
                             f"got {self.num_dec_blocks}")
        if len(self.heads) != levels:
            raise ValueError(f"heads needs {levels} entries, got {self.heads}")
        if self.rank_type not in RANK_TYPES:
            raise ValueError(f"rank_type must be one of {RANK_TYPES}, got {self.rank_type!r}")
        if self.fft_impl not in FFT_IMPLS:
            raise ValueError(f"fft_impl must be one of {FFT_IMPLS}, got {self.fft_impl!r}")
        if self.complexity_scale not in COMPLEXITY_SCALES:
            raise ValueError(f"complexity_scale must be one of {COMPLEXITY_SCALES}, got {self.complexity_scale!r}")
        if not 1 <= self.topk <= self.num_exp_blocks:
            raise ValueError(f"topk must be in 1..num_exp_blocks={self.num_exp_blocks}, got {self.topk}")
        for i, w in enumerate(self.widths):
            if w % self.heads[i]:
                raise ValueError(f"level {i} width {w} is not divisible by heads[{i}]={self.heads[i]}")
        if self.widths[-1] > MAX_RANK:
            raise ValueError(f"the widest level would have {self.widths[-1]} channels (dim {self.dim} x "
                             f"2**{self.levels - 1}), above {MAX_RANK}; choose a smaller dim")
        if self.num_exp_blocks > MAX_EXPERTS:
            raise ValueError(f"num_exp_blocks {self.num_exp_blocks} is above {MAX_EXPERTS}")
        if self._largest_rank_exceeds(MAX_RANK):  # checked before computing: 5000! has 16,000 digits
            raise ValueError(f"the largest expert rank would exceed {MAX_RANK} (rank_type {self.rank_type!r}, "
                             f"latent_dim {self.latent_dim}, {self.num_exp_blocks} experts); choose a smaller "
                             "latent_dim or another rank_type")
        ranks = self.expert_ranks(self.dim)  # the narrowest MoE layer has the smallest ranks
        if min(ranks) < 1:
            least = 2 ** (self.num_exp_blocks - 1)
            raise ValueError(f"expert ranks {ranks} at width dim={self.dim}: each must be at least 1; with rank_type "
                             f"'spread' dim must be at least 2**(num_exp_blocks - 1) = {least}")

    def _largest_rank_exceeds(self, limit: int) -> bool:
        n, r = self.num_exp_blocks, self.latent_dim
        if self.rank_type == "exp":  # r ** n
            return r > 1 and n * math.log(r) > math.log(limit)
        if self.rank_type == "fact":  # (r + n - 1)!
            return math.lgamma(r + n) > math.log(limit)
        return max(self.expert_ranks(self.widths[-2])) > limit  # linear in r or the width: cheap

    @property
    def levels(self) -> int:
        return len(self.num_blocks)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.dim * 2**i for i in range(self.levels))

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (self.levels - 1)

    def expert_ranks(self, width: int) -> list[int]:
        n, r = self.num_exp_blocks, self.latent_dim
        rules: dict[str, Callable[[int], int]] = {
            "spread": lambda i: width // 2 ** (n - 1 - i),
            "constant": lambda i: r,
            "lin": lambda i: r + i,
            "double": lambda i: r + 2 * i,
            "exp": lambda i: r ** (i + 1),
            "fact": lambda i: math.factorial(r + i),
        }
        return [rules[self.rank_type](i) for i in range(n)]

    def expert_patch_sizes(self) -> list[int]:
        return [2 ** (i + 2) for i in range(self.num_exp_blocks)]

    def replace(self, **overrides: Any) -> "MoCEConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown config field(s) {unknown}; valid fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoCEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class UnknownModelError(KeyError, ValueError):
    """A preset name that is not in PRESETS (a KeyError, as before, and a ValueError); prints without quotes."""

    def __str__(self) -> str:
        return str(self.args[0])


PRESETS: dict[str, MoCEConfig] = {
    "MoCE_IR_S": MoCEConfig(dim=32),
    "MoCE_IR": MoCEConfig(dim=48),
    # Test-sized network; identical to the configuration of golden/upstream_tiny_last.ckpt.
    "MoCE_IR_tiny": MoCEConfig(dim=8, num_blocks=(1, 1, 1, 2), num_dec_blocks=(1, 1, 1), heads=(1, 1, 2, 2),
                               num_refinement_blocks=1),
}


def get_config(name: str, **overrides: Any) -> MoCEConfig:
    """Preset ``name`` with keyword overrides of any field."""
    if not isinstance(name, str) or name not in PRESETS:
        raise UnknownModelError(f"unknown model {name!r}; valid choices: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
