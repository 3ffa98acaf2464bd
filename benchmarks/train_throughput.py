"""Training throughput (patches/s): one configuration, or the GPU window's matrix with correctness checks.

    python benchmarks/train_throughput.py --model MoCE_IR_S --batch_size 16 --precision bf16 --compile default
    python benchmarks/train_throughput.py --matrix gpu --out bench.jsonl --budget_s 170 --upstream_src .gpu/upstream/src
    python benchmarks/train_throughput.py --matrix dry --model MoCE_IR_tiny --patch_size 16 --out bench.jsonl
    eval "$(python benchmarks/train_throughput.py --selection bench.jsonl)"      # FAST_KEY, FAST_FLAGS, ... for bash

A step is forward, L1 + 0.1 FFT + 0.01 balance, backward and AdamW on one synthetic batch; moceir runs channels-last
with dense dispatch (no host synchronisation), upstream as its train.py does (NCHW).

The matrix (PLANS) runs each group of configurations in a process of its own under its own time limit, so a hanging
compile costs its group only, and it starts no group once --budget_s is spent. Every row is appended to --out (JSON
lines) as soon as it is measured; a configuration that failed, timed out, did not fit the budget or whose upstream
code is absent gets a row saying so. Each fast configuration is checked against the configuration without its first
fast feature (`Config.reference`, `precision_check.compare_losses`): same weights, batches and router noise
(Inductor's `fallback_random` makes compiled code draw the eager random numbers). The last line names the fastest
moceir configuration whose checks passed, down its chain of references, and the `moceir train` flags that run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

EAGER = "eager"
GRAPHS = "graphs"  # the whole step captured in one CUDA graph (moceir.captured_step, `moceir train --cuda_graphs`)
# moceir.runtime.COMPILE_MODES; repeated because this orchestrator does not import torch (moceir does)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Config:
    """One training configuration of the matrix."""

    impl: str = "moceir"  # "moceir" or "upstream" (eduardzamfir/MoCE-IR's network, from --upstream_src)
    mode: str = EAGER  # "eager", GRAPHS or a torch.compile mode (COMPILE_MODES)
    precision: str = "fp32"  # "fp32" or "bf16" autocast
    batch: int = 16
    fused_adamw: bool = False
    fft_impl: str = "fft"  # experts' FFT product: "fft" or "matmul" (real-valued, which Inductor compiles)
    # What one compiled graph covers (moceir.runtime.COMPILE_SCOPES): "network", or "blocks" (each transformer
    # block compiled on its own, blocks of a level sharing the code). With GRAPHS, "blocks" captures the step over
    # blocks compiled in torch.compile's default mode: fused kernels without launch overhead.
    scope: str = "network"

    @property
    def key(self) -> str:
        extras = [x for x, on in (("fused_adamw", self.fused_adamw), (f"fft_impl={self.fft_impl}",
                                                                        self.fft_impl != "fft")) if on]
        mode = self.mode + ("+blocks" if self.scope == "blocks" and self.mode != EAGER else "")
        return " ".join([self.impl, mode, self.precision, f"b{self.batch}", *extras])

    def reference(self) -> Config | None:
        """What this configuration is checked against: itself without its first fast feature (None: a baseline)."""
        if self.impl != "moceir":
            return None
        if self.mode != EAGER:
            return dataclasses.replace(self, mode=EAGER, scope="network")
        for name, plain in (("fused_adamw", False), ("fft_impl", "fft"), ("precision", "fp32")):
            if getattr(self, name) != plain:
                return dataclasses.replace(self, **{name: plain})
        return None

    @property
    def trainable(self) -> bool:
        """Whether `moceir train` can train this way (the selection picks only such configurations)."""
        return self.impl == "moceir"

    def train_flags(self) -> list[str]:
        """The `moceir train` flags that train this way (moceir only)."""
        if not self.trainable:
            raise ValueError(f"`moceir train` has no flags for {self.key}")
        # GRAPHS with scope "blocks" captures the step over blocks compiled in torch.compile's default mode
        compile_mode = {EAGER: "none", GRAPHS: "default" if self.scope == "blocks" else "none"}.get(self.mode,
                                                                                                   self.mode)
        flags = ["--compile", compile_mode,
                 "--precision", {"fp32": "32-true", "bf16": "bf16-mixed"}[self.precision],
                 "--batch_size", str(self.batch), "--dispatch", "dense", "--channels_last"]
        flags += ["--compile_scope", self.scope] * (compile_mode != "none" and self.scope != "network")
        flags += ["--cuda_graphs"] * (self.mode == GRAPHS)
        return flags + ["--fused_adamw"] * self.fused_adamw + ["--fft_impl", self.fft_impl]


@dataclass(frozen=True)
class Plan:
    """Groups of configurations, most telling first: (name, seconds allowed, configurations)."""

    groups: list[tuple[str, float, list[Config]]]
    known_good: Config  # what trained before: the fallback
    check_steps: int = 3  # steps compared against the reference (they also warm up, and compile)
    warmup: int = 2  # further untimed steps
    repeats: int = 5  # timed steps (median)
    min_group_s: float = 20.0  # a group is not started with less budget than this left
    notes: dict = field(default_factory=dict)


def _gpu_plan() -> Plan:
    # Window 3 (2026-11-27, H200) measured eager fp32 (50.2 patches/s at b16, 81.3 at b64), the whole step captured
    # by hand in a CUDA graph (67.4 at b16, 85.6 at b64) and upstream (38.1 at b16); its compile group timed out.
    # At b64 the GPU is the bound: about 190 ms of fp32 kernels per 16 patches, where 440 patches/s allows 36 ms.
    # Only fewer bytes moved can close that (benchmarks/step_traffic.py: 239 GB per eager step of 16 patches), that
    # is Inductor's fused kernels and bf16. A cold compile of the whole network took 362 s on the 2-core CPU, so the
    # plan compiles each block instead (`scope="blocks"`: 7 graphs for MoCE_IR_S, 173 s on that CPU, about half of
    # it C++ compilation that Triton does in parallel on the GPU machine's 16 cores), then captures the step over
    # those compiled blocks in the same process (Dynamo's compiled code is reused: same guards, autocast cache
    # off). Eager fp32 b16 comes first (the same-run baseline and every check's reference), eager b64 (the fastest
    # trainable configuration so far; out of memory on an H100), upstream for the ratio; the step captured at b64
    # (what `moceir train --cuda_graphs` runs since 2026-11-28) and window 3's unmeasured eager variants only if time
    # is left. Every moceir row can be selected, the captured ones included.
    C = Config
    compiled = dict(scope="blocks", precision="bf16", fft_impl="matmul")
    return Plan(
        groups=[
            ("moceir eager", 65, [C(precision="fp32"), C(precision="fp32", batch=64)]),
            ("upstream eager", 25, [C("upstream", precision="fp32")]),
            ("compile blocks", 150, [C(mode="default", **compiled), C(mode=GRAPHS, **compiled)]),
            ("moceir variants", 60, [C(mode=GRAPHS, precision="fp32", batch=64), C(precision="fp32", batch=32),
                                     C(precision="bf16"), C(precision="fp32", fft_impl="matmul")]),
        ],
        known_good=C(precision="fp32"),
        notes={"compiled rows": "bf16, batch 16, fft_impl=matmul, each block compiled on its own: compiles are slow, "
                                "and Inductor generates no code for the complex operators of fft_impl=fft",
               "upstream": "fp32 only: upstream's network fails under bf16 autocast (scatter() dtype mismatch, "
                           "window 3)"},
    )


def _dry_plan() -> Plan:
    C = Config
    return Plan(
        groups=[
            ("moceir eager", 60, [C(precision="fp32", batch=4), C(precision="bf16", batch=4),
                                  C(precision="fp32", batch=2), C(precision="fp32", batch=4, fused_adamw=True)]),
            ("upstream eager", 30, [C("upstream", precision="fp32", batch=4)]),
            ("compile default", 25, [C(mode="default", scope="blocks", precision="fp32", batch=4)]),
        ],
        known_good=C(precision="bf16", batch=4),
        check_steps=2, warmup=1, repeats=2, min_group_s=8.0,
        notes={"compile default": "a cold Inductor cache took 190-210 s for MoCE_IR_tiny on the 2-core CPU; the 25 s "
                                  "limit records a timeout there, a warm cache finishes"},
    )


PLANS = {"gpu": _gpu_plan, "dry": _dry_plan}


# ---------------------------------------------------------------------------------------------------- worker
def _build(cfg: Config, model_name: str, device, upstream_src: str | None):
    """The network of ``cfg`` with the weights of ``moceir.create_model(model_name)`` after seed 0, in train mode."""
    import torch

    import moceir

    torch.manual_seed(0)
    ours = moceir.create_model(model_name, fft_impl=cfg.fft_impl).set_dispatch("dense")
    if cfg.impl == "moceir":
        return ours.to(device).train()
    from compare_upstream import load_upstream

    pylib = Path(upstream_src).parent / "pylib"  # einops, put there by scripts/prepare_gpu_window.sh
    if pylib.is_dir() and str(pylib) not in sys.path:
        sys.path.append(str(pylib))
    net = load_upstream(upstream_src, ours.config)
    net.load_state_dict(ours.state_dict(), strict=True)
    for m in net.modules():  # load_upstream zeroes the router noise for eval comparisons; training keeps it
        if hasattr(m, "noise_std"):
            m.noise_std = 1.0 / m.num_experts
    return net.to(device).train()


def _graphed_stepper(model, cfg: Config, device):
    """:func:`_stepper` for GRAPHS: what `moceir train --cuda_graphs` runs (:class:`moceir.captured_step.
    CapturedTrainStep`): forward, loss, backward and a capturable AdamW step captured in one CUDA graph.

    Each call copies (lq, gt) into the graph's static inputs and replays it. The first call's warm-up is undone
    (weights, optimizer state and the caller's random state put back), so the first replay computes the loss of the
    initial weights with the router noise the eager reference draws.
    """
    import torch

    from moceir.captured_step import CapturedTrainStep
    from moceir.losses import restoration_loss

    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    if cfg.scope == "blocks":  # Inductor's fused kernels, launched from the captured graph
        from moceir.runtime import compile_network

        compile_network(model, "default", "blocks")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=cfg.fused_adamw or None)
    step = CapturedTrainStep(model, opt, lambda out, gt: restoration_loss(out.image, gt, out.balance_loss, "fft"),
                             torch.bfloat16 if cfg.precision == "bf16" else None)
    return lambda lq, gt: step(lq, gt)["loss"]


def _stepper(model, cfg: Config, device):
    """A function (lq, gt) -> detached loss running one optimizer step of ``model`` as ``cfg`` says."""
    import torch

    if cfg.mode == GRAPHS:
        return _graphed_stepper(model, cfg, device)

    from common import autocast
    from moceir.losses import restoration_loss
    from moceir.runtime import compile_network

    if cfg.mode != EAGER:
        compile_network(model, cfg.mode, cfg.scope)  # as `moceir train --compile`: eager's router noise (the check)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=cfg.fused_adamw or None)

    # Compiled rows run autocast without its cast cache, as the captured step must: Dynamo guards on that flag, so
    # the captured step over compiled blocks then reuses the compiled row's code instead of tracing it again.
    cache = cfg.mode == EAGER

    def step(lq, gt):
        if cfg.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, cfg.precision, cache_enabled=cache):
            out = model(lq)
            image, balance = (out.image, out.balance_loss) if cfg.impl == "moceir" else (out, model.total_loss)
            loss = restoration_loss(image, gt, balance, "fft")["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _losses(step, batches) -> list[float]:
    import torch

    out = []
    for i, (lq, gt) in enumerate(batches):
        torch.manual_seed(100 + i)  # the same router noise for a configuration and its reference
        out.append(step(lq, gt))
    return [float(x) for x in out]  # one host sync, after the steps


def _measured_reference(cfg: Config, measured: dict[str, list[float]]) -> tuple[Config, list[float]] | None:
    """The first configuration down ``cfg``'s chain of references whose check losses were already measured.

    Every row's check holds the losses of its own first steps (same weights, batches and router noise in every
    row), so a reference measured earlier in the matrix need not be run again: a compile gets those seconds.
    """
    ref = cfg.reference()
    while ref is not None:
        if ref.key in measured:
            return ref, measured[ref.key]
        ref = ref.reference()
    return None


def measure(cfg: Config, plan: Plan, model_name: str, patch: int, device, upstream_src: str | None,
            measured: dict[str, list[float]] | None = None) -> dict:
    """One row: patches/s (median step), peak memory, the first steps' time, and the check against the reference.

    ``measured``: check losses of configurations already measured (key -> losses); the reference is taken from
    there when it or one further down its chain is in it, and run here otherwise.
    """
    import torch

    from common import peak_memory_mb, reset_peak, sync, timeit
    from precision_check import compare_losses, fixed_batches

    batches = fixed_batches(plan.check_steps, cfg.batch, patch, device, channels_last=cfg.impl == "moceir")
    row: dict = {"kind": "row", "key": cfg.key, **dataclasses.asdict(cfg), "patch": patch}
    ref, ref_losses = _measured_reference(cfg, measured or {}) or (cfg.reference(), None)
    reused = ref_losses is not None
    if ref is not None and not reused:
        ref_losses = _losses(_stepper(_build(ref, model_name, device, upstream_src), ref, device), batches)
    reset_peak(device)
    step = _stepper(_build(cfg, model_name, device, upstream_src), cfg, device)
    t0 = time.perf_counter()
    losses = _losses(step, batches)
    sync(device)
    row["first_steps_s"] = time.perf_counter() - t0  # includes compiling
    if ref is not None:
        row["check"] = {"reference": ref.key, "reference_reused": reused,
                        **compare_losses(ref_losses, losses, cfg.precision)}
    else:
        row["check"] = {"reference": None, "losses": losses, "passed": all(map(math.isfinite, losses))}
    lq, gt = batches[0]
    sec = timeit(lambda: step(lq, gt), device, plan.warmup, plan.repeats)
    if device.type == "cuda":  # a CUDA graph's replays allocate nothing: its memory is reserved in the graph's pool
        row["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    row.update(status="ok", patches_per_s=cfg.batch / sec, step_ms=1000 * sec, peak_mb=peak_memory_mb(device),
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"cpu x{torch.get_num_threads()} threads")
    return row


def _append(path: str | None, row: dict) -> None:
    """Append ``row`` to the JSON lines at ``path`` (if any) and print its gist."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
    shown = {k: row[k] for k in ("key", "status", "patches_per_s", "reason") if k in row}
    if "check" in row:
        shown["check_passed"] = row["check"].get("passed")
    print(json.dumps(shown), flush=True)


def _check_losses(rows: list[dict], patch: int) -> dict[str, list[float]]:
    """Key -> check losses of the rows measured since the matrix's last meta line (none without one)."""
    metas = [i for i, r in enumerate(rows) if r.get("kind") == "meta"]
    if not metas:
        return {}
    return {r["key"]: r["check"]["losses"] for r in rows[metas[-1]:]
            if r.get("kind") == "row" and r.get("status") == "ok" and r.get("patch") == patch}


def run_worker(a: argparse.Namespace) -> None:
    import torch

    plan = PLANS[a.plan]()
    configs = [Config(**c) for c in json.loads(a.configs)]
    device = torch.device(a.device)
    torch.set_float32_matmul_precision("high")  # as `moceir train` (TF32 on CUDA)
    torch.backends.cudnn.benchmark = False  # autotuning cost minutes on a fresh machine in the first GPU session
    measured = _check_losses(read_rows(a.out), a.patch_size) if a.out else {}
    for cfg in configs:
        t0 = time.perf_counter()
        try:
            row = measure(cfg, plan, a.model, a.patch_size, device, a.upstream_src, measured)
            measured[row["key"]] = row["check"]["losses"]
        except Exception as err:  # one failed configuration must not end the group
            row = {"kind": "row", "key": cfg.key, **dataclasses.asdict(cfg), "status": "failed",
                   "reason": f"{type(err).__name__}: {err}"[:400]}
        row["wall_s"] = time.perf_counter() - t0
        _append(a.out, row)
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- matrix
def _run_group(configs: list[Config], timeout: float, a: argparse.Namespace) -> tuple[int | None, float]:
    """Run a worker for ``configs``; kill its whole process group (compile workers too) after ``timeout`` s.

    Returns (exit code or None when killed, seconds).
    """
    cmd = [sys.executable, __file__, "--worker", "--plan", a.matrix, "--configs",
           json.dumps([dataclasses.asdict(c) for c in configs]), "--model", a.model, "--patch_size",
           str(a.patch_size), "--device", a.device, "--out", a.out]
    if a.upstream_src:
        cmd += ["--upstream_src", a.upstream_src]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=timeout), time.monotonic() - t0
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - t0
    finally:  # also when this process is stopped (SIGTERM from `timeout`): no worker outlives it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _keys_in(path: str) -> set[str]:
    return {r["key"] for r in read_rows(path) if r.get("kind") == "row"}


def read_rows(path: str) -> list[dict]:
    """The JSON lines of a matrix file (a half-written last line is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _not_run(cfg: Config, status: str, reason: str) -> dict:
    return {"kind": "row", "key": cfg.key, **dataclasses.asdict(cfg), "status": status, "reason": reason}


def run_matrix(a: argparse.Namespace) -> None:
    plan = PLANS[a.matrix]()
    deadline = time.monotonic() + a.budget_s
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through _run_group's cleanup
    upstream = a.upstream_src if a.upstream_src and Path(a.upstream_src, "net", "moce_ir.py").is_file() else None
    _append(a.out, {"kind": "meta", "plan": a.matrix, "model": a.model, "patch": a.patch_size, "device": a.device,
                    "budget_s": a.budget_s, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "upstream_src": upstream, "notes": plan.notes, "key": "meta"})
    for name, limit, configs in plan.groups:
        left = deadline - time.monotonic()
        if configs[0].impl == "upstream" and upstream is None:
            for cfg in configs:
                _append(a.out, _not_run(cfg, "not available", f"upstream: not available (no {a.upstream_src}/net/"
                                        "moce_ir.py; run scripts/prepare_gpu_window.sh)"))
            continue
        if left < plan.min_group_s:
            for cfg in configs:
                _append(a.out, _not_run(cfg, "skipped", f"phase budget of {a.budget_s:g} s spent ({left:.0f} s left)"))
            continue
        timeout = min(limit, left)
        rc, secs = _run_group(configs, timeout, a)
        done = _keys_in(a.out)
        missing = [c for c in configs if c.key not in done]
        for i, cfg in enumerate(missing):
            if i == 0:
                why = (f"timeout: group '{name}' did not finish within {timeout:.0f} s" if rc is None
                       else f"worker exited with code {rc} after {secs:.0f} s")
                _append(a.out, _not_run(cfg, "timeout" if rc is None else "failed", why))
            else:
                _append(a.out, _not_run(cfg, "skipped", f"group '{name}' stopped before it"))
    _append(a.out, select(read_rows(a.out), plan))


def _passed(row: dict, by_key: dict[str, dict]) -> bool:
    """Measured, and its check passed, and so did its reference's (when the matrix measured the reference)."""
    if row.get("status") != "ok" or not row.get("check", {}).get("passed"):
        return False
    ref = row["check"].get("reference")
    return ref is None or ref not in by_key or _passed(by_key[ref], by_key)


def select(rows: list[dict], plan: Plan) -> dict:
    """The selection line: the fastest moceir row that passed, else the known-good configuration."""
    measured = {r["key"]: r for r in rows if r.get("kind") == "row"}
    fields = {f.name for f in dataclasses.fields(Config)}

    def config(row: dict) -> Config:
        return Config(**{k: row[k] for k in fields if k in row})  # rows older than a field take its default

    ok = [r for r in measured.values() if config(r).trainable and _passed(r, measured)]
    best = max(ok, key=lambda r: r["patches_per_s"], default=None)
    known = plan.known_good
    fast = config(best) if best else known
    known_row = measured.get(known.key, {})
    return {"kind": "selection", "key": "selection", "fastest": fast.key,
            "fastest_patches_per_s": best["patches_per_s"] if best else known_row.get("patches_per_s"),
            "fastest_flags": fast.train_flags(), "batch": fast.batch,
            "known_good": known.key, "known_good_flags": known.train_flags(),
            "known_good_patches_per_s": known_row.get("patches_per_s"),
            "why": (f"fastest of {len(ok)} moceir configuration(s) whose checks passed" if best else
                    "no moceir configuration passed: the known-good one")}


def print_selection(path: str) -> None:
    """Bash assignments from the selection line of ``path`` (for eval)."""
    sel = [r for r in read_rows(path) if r.get("kind") == "selection"]
    if not sel:
        raise SystemExit(f"error: no selection line in {path}")
    s = sel[-1]
    values = {"FAST_KEY": s["fastest"], "FAST_FLAGS": " ".join(s["fastest_flags"]), "FAST_BATCH": s["batch"],
              "FAST_RATE": s["fastest_patches_per_s"] or "", "KNOWN_KEY": s["known_good"],
              "KNOWN_FLAGS": " ".join(s["known_good_flags"]), "KNOWN_RATE": s["known_good_patches_per_s"] or ""}
    print("\n".join(f"{k}={shlex.quote(str(v))}" for k, v in values.items()))


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", choices=list(PLANS), help="run this plan of configurations")
    p.add_argument("--selection", metavar="JSONL", help="print the selection of a matrix file as bash assignments")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plan", default="gpu", help=argparse.SUPPRESS)
    p.add_argument("--configs", help=argparse.SUPPRESS)
    p.add_argument("--out", help="JSON lines, appended row by row (required with --matrix)")
    p.add_argument("--budget_s", type=float, default=170.0, help="matrix: no group starts after this")
    p.add_argument("--upstream_src", help="the src folder of eduardzamfir/MoCE-IR (see prepare_gpu_window.sh)")
    p.add_argument("--model", default="MoCE_IR_S")
    p.add_argument("--patch_size", type=int, default=128)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--impl", choices=["moceir", "upstream"], default="moceir", help="one configuration: network")
    p.add_argument("--batch_size", type=int, default=16, help="one configuration: batch")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="one configuration: autocast")
    p.add_argument("--compile", default=EAGER, choices=[EAGER, GRAPHS, *COMPILE_MODES],
                   help="one configuration: eager, the step captured in a CUDA graph, or a torch.compile mode")
    p.add_argument("--fused_adamw", action="store_true", help="one configuration: fused AdamW")
    p.add_argument("--fft_impl", choices=["fft", "matmul"], default="fft", help="one configuration: FFT product")
    p.add_argument("--compile_scope", choices=["network", "blocks"], default="network",
                   help="one configuration: what a compiled graph covers (with --compile graphs: blocks compiled "
                        "in default mode inside the captured step)")
    a = p.parse_args()
    if a.selection:
        return print_selection(a.selection)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.worker:
        return run_worker(a)
    if a.matrix:
        if not a.out:
            p.error("--matrix needs --out")
        return run_matrix(a)
    cfg = Config(a.impl, a.compile, a.precision, a.batch_size, a.fused_adamw, a.fft_impl, a.compile_scope)
    a.plan, a.configs = "gpu", json.dumps([dataclasses.asdict(cfg)])
    run_worker(a)


if __name__ == "__main__":
    main()
