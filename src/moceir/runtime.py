"""Process-level tuning for CPU inference and training, applied by the command line and the benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


class UsageError(ValueError):
    """Options that cannot work (a report path that is an input, fp16 on a CPU, ...): one line, nothing done."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt is, so that the same clean-up runs
    (the command line installs it: moceir.cli)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``str(error)``, cut to ``limit`` characters; "" for an empty message (a MemoryError())."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else ""


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of a distributed run (or there is none): the one that prints and reports.

    Before the process group starts, the launcher's environment tells: torchrun and SLURM set the global rank,
    Lightning's own launcher, which starts the other ranks as copies of this command, sets the node and local ranks.
    """
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


def resolve_device(name: "str | int | torch.device") -> "torch.device":
    """"auto" -> CUDA if available else CPU; an int N -> cuda:N. A device that cannot run the network here (CUDA
    on a build or machine without it, an index beyond the GPUs, "meta", a typo) is a UsageError. Apple's "mps" and
    Intel's "xpu" pass where their backend is available (moceir is tested on CPU and CUDA only)."""
    import torch

    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, (str, int, torch.device)) or isinstance(name, bool):
        raise UsageError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (a str, int or torch.device), not "
                         f"{type(name).__name__}")
    try:
        device = torch.device("cuda", name) if isinstance(name, int) else torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                 "xpu": hasattr(torch, "xpu") and torch.xpu.is_available()}
    if device.type not in available:  # torch parses e.g. "meta", on which nothing can be computed
        raise UsageError(f"device {str(device)!r} cannot restore images; use auto, cpu or cuda[:N]")
    if not available[device.type]:
        why = ("this PyTorch build has no CUDA" if device.type == "cuda" and torch.version.cuda is None
               else f"no {device.type.upper()} device is available")
        raise UsageError(f"device {str(device)!r} requested but {why}; use cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {str(device)!r} requested but this machine has {torch.cuda.device_count()} "
                         "CUDA device(s); use cuda:0 to cuda:N-1")
    return device


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_tuned = False


def tune_cpu_allocator(keep_bytes: int = 256 << 20) -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS after every tensor.

    The network allocates and frees activations of tens to hundreds of MB per layer; by default glibc serves
    each from a fresh mmap and unmaps it on free, so every layer pays page faults (on 2 cores, 512x512
    MoCE-IR-S spent 12 s of 37 s CPU time in the kernel; restoring 481x321 images, 55 s of 122 s). Raising the
    mmap and trim thresholds keeps that memory in the heap, 1.2 to 2x faster. The price is fragmentation: a
    forward pass then peaks higher (4.7 GB against 1.8 GB at 760x760), which the memory model of automatic tiling
    takes into account (:func:`allocator_tuned`, :func:`moceir.inference.bytes_per_pixel`).
    Returns False where this is not glibc, or when MOCEIR_NO_ALLOCATOR_TUNING=1.
    """
    global _tuned
    if not sys.platform.startswith("linux") or os.environ.get("MOCEIR_NO_ALLOCATOR_TUNING") == "1":
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, keep_bytes) and mallopt(_M_TRIM_THRESHOLD, 2 * keep_bytes - 1)
    _tuned = bool(ok and mallopt(_M_TOP_PAD, 256 << 20))
    return _tuned


def allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` took effect in this process."""
    return _tuned


def release_freed_memory() -> None:
    """Give memory that the tuned allocator keeps back to the OS (glibc ``malloc_trim``); between tiles, so that
    one tile's freed blocks do not pile up under the next one's. A no-op unless the allocator is tuned."""
    if _tuned:
        trim = getattr(_libc(), "malloc_trim", None)
        if trim is not None:
            trim(0)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")  # torch.compile modes we offer
# What one torch.compile call covers: the whole network, or each transformer block on its own ("regional
# compilation": blocks of one width share their compiled code, so MoCE-IR-S compiles 7 graphs, not 38 blocks' worth).
COMPILE_SCOPES = ("network", "blocks")


def compile_network(net: "torch.nn.Module", mode: str, scope: str = "network") -> None:
    """``torch.compile`` ``net`` in place in ``mode``, as ``moceir train --compile`` and
    benchmarks/train_throughput.py do. Compiled code draws random numbers (the router noise) with eager's
    generator (Inductor's process-wide ``fallback_random``), so a compiled step can be checked against eager, and a
    compile cached by the benchmark serves training.

    ``scope="blocks"`` compiles every encoder and decoder block instead of the network, with static shapes: the
    code of one block serves every block of its level (one graph per level and block type), and the few layers
    between blocks (patch embedding, up- and downsampling, the skip fusions, the output) stay eager.
    """
    import torch
    import torch._inductor.config as inductor

    from .models.blocks import DecoderBlock, EncoderBlock

    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    inductor.fallback_random = True
    if scope == "network":
        net.compile(mode=mode)
        return
    blocks = [m for m in net.modules() if isinstance(m, (EncoderBlock, DecoderBlock))]
    # Each block's code sees one input shape per level, and more with another batch or image size or in eval mode;
    # the default limit of 8 entries per code object would send the rest to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for m in blocks:
        m.compile(mode=mode, dynamic=False)
