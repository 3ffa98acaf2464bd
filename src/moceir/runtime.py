"""Process-level tuning for CPU inference and training, applied by the command line and the benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_cpu_allocator(keep_bytes: int = 256 << 20) -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS after every tensor.

    The network allocates and frees activations of tens to hundreds of MB per layer; by default glibc serves
    each from a fresh mmap and unmaps it on free, so every layer pays page faults (on 2 cores, 512x512
    MoCE-IR-S spent 12 s of 37 s CPU time in the kernel). Raising the mmap and trim thresholds keeps that
    memory in the heap. Returns False where this is not glibc, or when MOCEIR_NO_ALLOCATOR_TUNING=1.
    The process's RSS then stays near its peak. ``moceir restore`` does not apply it: across tiles the kept
    memory nearly doubled the peak (2.4 GB against 1.4 GB for 512x512 tiles of MoCE-IR-S), which the memory
    bound of restore cannot afford, for a few percent of speed.
    """
    if not sys.platform.startswith("linux") or os.environ.get("MOCEIR_NO_ALLOCATOR_TUNING") == "1":
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, keep_bytes) and mallopt(_M_TRIM_THRESHOLD, 2 * keep_bytes - 1)
    return bool(ok and mallopt(_M_TOP_PAD, 256 << 20))
