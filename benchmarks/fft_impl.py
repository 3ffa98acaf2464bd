"""The experts' per-patch FFT product computed with torch.fft against real matrix forms (issue 13).

    python benchmarks/fft_impl.py                                  # all sections, 2 threads
    python benchmarks/fft_impl.py --sections experts network --sizes 256 1024 --repeats 3
    python benchmarks/fft_impl.py --sections precision compile

Sections (each prints a markdown table):
- ``experts``: eager CPU time of ``irfft2(rfft2(q) * rfft2(k))`` on p x p patches for each expert of MoCE-IR-S at
  256x256 input (real ranks and map sizes: levels 0-2 of the decoder), for every form below, and of the whole
  ComplexityExpert with the library's two paths;
- ``network``: the bundled default model (MoCE-IR-S, channels-last) at each ``--sizes``, fft_impl "fft" against
  "matmul", batch 1, fp32, interleaved, median of ``--repeats``;
- ``precision``: the network's error under bf16 / fp16 autocast with each fft_impl, against fp32, and what it would
  be if the transform itself ran in the low precision (why the library keeps it in fp32);
- ``compile``: CPU ``torch.compile`` of the network with fft_impl="matmul": compile time, speed, equal outputs.

Forms of the product (all real-valued except "fft"):
- ``fft``: torch.fft.rfft2 / irfft2 (the library's fft_impl="fft");
- ``matmul``: separable real DFT matrices, no patch transposes (the library's fft_impl="matmul");
- ``naive``: the same separable transform as batched p x p matrix products on transposed patches;
- ``kron``: the whole 2D rfft2 as one [p^2, 2p(p/2+1)] matrix on flattened patches: one big GEMM per transform;
- ``circulant``: the circular convolution itself as a per-patch [p^2, p^2] circulant GEMM (p <= 8 only: the
  circulant holds p^2 copies of each patch).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import common  # noqa: F401  (importing it applies the allocator tuning, as the moceir command does)
import moceir
from moceir.models import attention
from moceir.models.experts import ComplexityExpert

PATCHES = (4, 8, 16, 32)
# MoCE-IR-S decoder levels at 256x256 input: (map side, width); expert i has rank width / 2^(3-i), patch 4 * 2^i.
LEVELS = ((256, 32), (128, 64), (64, 128))


def _patches(t: torch.Tensor, p: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """[B, C, H, W] -> (fp32 [N, p, p] patches, (b, c, h, w, nh, nw))."""
    b, c, h, w = t.shape
    t = F.pad(t.float(), (0, -w % p, 0, -h % p))
    nh, nw = t.shape[-2] // p, t.shape[-1] // p
    return t.reshape(b, c, nh, p, nw, p).transpose(3, 4).reshape(-1, p, p), (b, c, h, w, nh, nw)


def _unpatch(x: torch.Tensor, p: int, shape: tuple[int, ...]) -> torch.Tensor:
    b, c, h, w, nh, nw = shape
    return x.reshape(b, c, nh, nw, p, p).transpose(3, 4).reshape(b, c, nh * p, nw * p)[:, :, :h, :w]


def naive(q: torch.Tensor, k: torch.Tensor, p: int, dft=None) -> torch.Tensor:
    w_cos, w_sin, h_fwd, h_inv, w_inv = attention.real_dft_matrices(p, device=q.device)
    cos_h, sin_h = h_fwd[:p, :p], h_fwd[:p, p:]
    qx, shape = _patches(q, p)
    kx, _ = _patches(k, p)

    def spectrum(x):
        a, b = x @ w_cos, x @ w_sin  # width rfft: [N, p, m]
        return cos_h @ a + sin_h @ b, cos_h @ b - sin_h @ a  # height DFT: batched p x p products

    (qr, qi), (kr, ki) = spectrum(qx), spectrum(kx)
    pr, pi = qr * kr - qi * ki, qr * ki + qi * kr
    ur, ui = (cos_h @ pr - sin_h @ pi) / p, (cos_h @ pi + sin_h @ pr) / p
    return _unpatch(torch.cat([ur, ui], -1) @ w_inv, p, shape)


_KRON: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _kron_matrices(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    if p not in _KRON:
        basis = torch.eye(p * p, dtype=torch.float64).view(p * p, p, p)
        spec = torch.fft.rfft2(basis).reshape(p * p, -1)
        m = spec.shape[1]
        unit = torch.eye(m, dtype=torch.complex128).view(m, p, p // 2 + 1)
        inv = torch.cat([torch.fft.irfft2(unit, s=(p, p)), torch.fft.irfft2(1j * unit, s=(p, p))]).reshape(2 * m, -1)
        _KRON[p] = (torch.cat([spec.real, spec.imag], 1).float(), inv.float())
    return _KRON[p]


def kron(q: torch.Tensor, k: torch.Tensor, p: int, dft=None) -> torch.Tensor:
    fwd, inv = _kron_matrices(p)
    m = fwd.shape[1] // 2
    qx, shape = _patches(q, p)
    kx, _ = _patches(k, p)
    qs, ks = qx.reshape(-1, p * p) @ fwd, kx.reshape(-1, p * p) @ fwd
    qr, qi, kr, ki = qs[:, :m], qs[:, m:], ks[:, :m], ks[:, m:]
    return _unpatch(torch.cat([qr * kr - qi * ki, qr * ki + qi * kr], 1) @ inv, p, shape)


def circulant(q: torch.Tensor, k: torch.Tensor, p: int, dft=None) -> torch.Tensor:
    i = torch.arange(p)
    dh = (i[:, None, None, None] - i[None, None, :, None]) % p  # out row - in row
    dw = (i[None, :, None, None] - i[None, None, None, :]) % p
    index = (dh * p + dw).reshape(p * p, p * p)  # [out pixel, in pixel] -> k pixel
    qx, shape = _patches(q, p)
    kx, _ = _patches(k, p)
    circ = kx.reshape(-1, p * p)[:, index]  # [N, p^2, p^2]
    return _unpatch(torch.bmm(circ, qx.reshape(-1, p * p, 1)), p, shape)


FORMS = {"fft": attention.PATCH_PRODUCTS["fft"], "matmul": attention.PATCH_PRODUCTS["matmul"], "naive": naive,
         "kron": kron, "circulant": circulant}


def median_s(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def section_experts(repeats: int) -> None:
    print("\n### Patch product per expert (MoCE-IR-S at 256x256 input), ms, median of", repeats)
    names = list(FORMS)
    print("| map | p | rank | " + " | ".join(names) + " | expert fft | expert matmul | max rel. err. |")
    print("|---" * (len(names) + 6) + "|")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for side, width in LEVELS:
            for i, p in enumerate(PATCHES):
                rank = width // 2 ** (3 - i)
                q, k = (torch.randn(1, rank, side, side, generator=g) for _ in range(2))
                ref = FORMS["fft"](q, k, p, None)
                cells, err = [], 0.0
                for name, fn in FORMS.items():
                    if name == "circulant" and p > 8:
                        cells.append("-")
                        continue
                    err = max(err, ((fn(q, k, p, None) - ref).norm() / ref.norm()).item())
                    cells.append(f"{1000 * median_s(lambda: fn(q, k, p, None), repeats):.2f}")
                expert = ComplexityExpert(width, rank, p).eval().to(memory_format=torch.channels_last)
                x, s = (torch.randn(1, width, side, side, generator=g).contiguous(memory_format=torch.channels_last)
                        for _ in range(2))
                for impl in ("fft", "matmul"):
                    expert.body.fft_impl = impl
                    cells.append(f"{1000 * median_s(lambda: expert(x, s), repeats):.2f}")
                print(f"| {side}² | {p} | {rank} | " + " | ".join(cells) + f" | {err:.1e} |", flush=True)


def _network(impl: str) -> moceir.MoCEIR:
    return moceir.load_model("default", channels_last=True, fft_impl=impl)


def section_network(sizes: list[int], repeats: int) -> None:
    print("\n### Whole network (default model, channels-last, batch 1, fp32, sparse dispatch), s, median of", repeats)
    print("| size | fft | matmul | matmul / fft | max abs diff |\n|---|---|---|---|---|")
    models = {impl: _network(impl) for impl in ("fft", "matmul")}
    for size in sizes:
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        x = x.contiguous(memory_format=torch.channels_last)
        times: dict[str, list[float]] = {impl: [] for impl in models}
        outs = {}
        with torch.inference_mode():
            for impl, model in models.items():
                outs[impl] = model(x)  # warm-up
            for _ in range(repeats):  # interleaved, so that load from other processes hits both alike
                for impl, model in models.items():
                    t0 = time.perf_counter()
                    model(x)
                    times[impl].append(time.perf_counter() - t0)
        fft, mm = statistics.median(times["fft"]), statistics.median(times["matmul"])
        diff = (outs["fft"] - outs["matmul"]).abs().max().item()
        print(f"| {size}² | {fft:.3f} | {mm:.3f} | {mm / fft:.2f} | {diff:.1e} |", flush=True)


def _lowp_matmul(q: torch.Tensor, k: torch.Tensor, p: int, dft=None) -> torch.Tensor:
    """fft_impl="matmul" with the transform left to autocast (matrices and products in the low precision)."""
    dtype = torch.get_autocast_dtype(q.device.type)
    w_cos, w_sin, h_fwd, h_inv, w_inv = attention.real_dft_matrices(p, dtype, q.device)
    b, c, h, w = q.shape
    m = p // 2 + 1
    qp, kp = (F.pad(t.to(dtype), (0, -w % p, 0, -h % p)) for t in (q, k))
    rows, nw = b * c * (qp.shape[-2] // p), qp.shape[-1] // p

    def spectrum(t):
        x = t.reshape(rows, p, nw, p)
        z = torch.matmul(h_fwd, torch.stack([x @ w_cos, x @ w_sin], 1).reshape(rows, 2 * p, nw * m))
        return z.reshape(rows, 2, p, nw, m).unbind(1)

    (qr, qi), (kr, ki) = spectrum(qp), spectrum(kp)
    prod = torch.stack([qr * kr - qi * ki, qr * ki + qi * kr], 1).reshape(rows, 2 * p, nw * m)
    u = torch.matmul(h_inv, prod).reshape(rows, 2, p, nw, m)
    out = torch.cat([u[:, 0], u[:, 1]], -1) @ w_inv
    return out.reshape(b, c, *qp.shape[-2:])[:, :, :h, :w].float()


def section_precision(size: int) -> None:
    print("\n### The product alone in low precision: relative error against fp32 on the same rounded inputs")
    print("| p | bf16 autocast, matmul (fp32 inside) | transform in bf16 | transform in fp16 |\n|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for p in PATCHES:
        q, k = (torch.randn(1, 16, 64, 64, generator=g).to(torch.bfloat16).float() for _ in range(2))
        ref = FORMS["fft"](q, k, p, None)
        cells = []
        for dtype, inside in ((torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, False)):
            with torch.autocast("cpu", dtype=dtype):
                out = FORMS["matmul"](q, k, p, None) if inside else _lowp_matmul(q, k, p)
            cells.append(f"{((out.float() - ref).norm() / ref.norm()).item():.1e}")
        print(f"| {p} | " + " | ".join(cells) + " |")
    print(f"\n### Autocast error, default model at {size}x{size}, against fp32 with fft_impl=\"fft\"")
    print("| precision | fft_impl | max abs err | mean abs err | experts equal |\n|---|---|---|---|---|")
    attention.PATCH_PRODUCTS["matmul, transform in low precision"] = _lowp_matmul
    try:
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        model = moceir.load_model("default")
        with torch.inference_mode():
            ref = model(x, return_aux=True)
            for dtype in (torch.bfloat16, torch.float16):
                for impl in ("fft", "matmul", "matmul, transform in low precision"):
                    for m in model.modules():
                        if isinstance(m, attention.FFTAttention):
                            m.fft_impl = impl
                    with torch.autocast("cpu", dtype=dtype):
                        out = model(x, return_aux=True)
                    err = (out.image.float() - ref.image).abs()
                    same = bool((out.expert_indices == ref.expert_indices).all())
                    print(f"| {str(dtype).split('.')[-1]} | {impl} | {err.max().item():.2e} | "
                          f"{err.mean().item():.2e} | {same} |", flush=True)
    finally:
        del attention.PATCH_PRODUCTS["matmul, transform in low precision"]


def section_compile(size: int, repeats: int) -> None:
    print(f"\n### CPU torch.compile, default model, fft_impl=\"matmul\", {size}x{size}, batch 1, fp32")
    print("| variant | compile s (first call) | s per call | max abs diff to eager fft |\n|---|---|---|---|")
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = _network("fft")(x)
        for label, impl, dispatch, compiled in (("eager fft, sparse", "fft", "auto", False),
                                                ("eager matmul, sparse", "matmul", "auto", False),
                                                ("compiled matmul, sparse", "matmul", "sparse", True),
                                                ("compiled matmul, dense", "matmul", "dense", True)):
            model = _network(impl).set_dispatch(dispatch)
            fn = torch.compile(model) if compiled else model
            t0 = time.perf_counter()
            out = fn(x)
            first = time.perf_counter() - t0
            per_call = median_s(lambda: fn(x), repeats, warmup=1)
            diff = (out - ref).abs().max().item()
            print(f"| {label} | {first:.1f} | {per_call:.3f} | {diff:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["experts", "network", "precision", "compile"],
                        choices=["experts", "network", "precision", "compile"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 1024], help="network section input sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "experts" in args.sections:
        section_experts(args.repeats)
    if "network" in args.sections:
        section_network(args.sizes, args.repeats)
    if "precision" in args.sections:
        section_precision(256)
    if "compile" in args.sections:
        section_compile(256, args.repeats)


if __name__ == "__main__":
    main()
