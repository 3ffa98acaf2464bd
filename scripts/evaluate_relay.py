"""Evaluate a relay run in one command (issue 14, docs/gpu-window.md "Judge and ship"): fp16 export, judge, photos.

    python scripts/evaluate_relay.py runs/cpu_relay10 --out docs/runs/relay-10 --reuse docs/runs/relay-8

RUN is a training folder (``model.safetensors`` and ``model_ema.safetensors``, exported here to fp16 beside them
with ``moceir export``: the files a ship bundles) or an unpacked GPU window (``model_fp16.safetensors`` and
``model_ema_fp16.safetensors``). ``scripts/judge_relay.py`` then judges both against the shipped model (it also runs
the flat sky), and ``benchmarks/clean_photos.py`` runs the three on clean photos. Each child is timed (wall clock
and peak RSS). ``--out``/checks.md records every model's flat-sky rows (from judgement.json), the clean-photo tables
and the timings, for the model card; it is written only after a judgement, and an existing checks.md that this
script did not write (runs 8 and 9's, by hand) is refused up front. This replaces the per-session evaluation
scripts of runs 8 and 9, which also ran benchmarks/flat_region.py on each model, repeating the judge's flat sky.

This process imports neither torch nor moceir before its children have run: ``ru_maxrss`` survives ``exec``, so a
child forked from a process holding torch would report at least that process's size.

Exit code: 0 when judged and the clean photos measured; the judge's when it fails (1, or 2 on its bad usage; then
nothing else runs); 1 when an export fails, when the clean-photo check fails (the judgement stands) or when a child
is killed; 2 on bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEMS = ("model", "model_ema")
MARK = "Written by `python scripts/evaluate_relay.py"


class EvaluationError(Exception):
    """A run folder that cannot be evaluated; the message is the one-line error."""


def _script(*parts: str) -> str:
    """A script of this repository, relative to the working directory where it can be (shorter commands)."""
    path = ROOT.joinpath(*parts)
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive
        return str(path)


def candidates(run: Path) -> list[Path]:
    """The run's fp16 raw and EMA files, exporting a training folder's fp32 files when their fp16 copy is missing."""
    out = []
    for stem in STEMS:
        fp16, fp32 = run / f"{stem}_fp16.safetensors", run / f"{stem}.safetensors"
        if os.path.lexists(fp16) and not fp16.is_file():
            raise EvaluationError(f"{fp16} is not a file (a dangling link or a folder?); move it aside")
        if fp16.exists() and fp32.exists() and fp16.stat().st_mtime < fp32.stat().st_mtime:
            raise EvaluationError(f"{fp16} is older than {fp32} (trained again since the export?); move it aside "
                                  "to export again")
        if not fp16.exists():
            if not fp32.exists():
                raise EvaluationError(f"{run}: holds neither {fp16.name} nor {fp32.name}; pass a training folder "
                                      "(--ckpt_dir/--run_name of moceir train) or an unpacked GPU window")
            cmd = [sys.executable, "-m", "moceir", "export", str(fp32), str(fp16), "--dtype", "fp16"]
            if subprocess.run(cmd).returncode != 0:  # moceir export has printed its one-line error
                raise EvaluationError(f"{fp32}: the fp16 export failed (above); nothing was judged")
        out.append(fp16)
    return out


def timed(cmd: list[str], capture: bool = False) -> dict:
    """Run ``cmd``: its exit code, start/end (UTC), elapsed seconds, peak RSS (kB, from ``wait4``) and
    (``capture``) stdout; stderr passes through."""
    start, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    stdout = proc.stdout.read() if capture else ""  # before waiting: a full pipe would block the child
    _, status, usage = os.wait4(proc.pid, 0)
    return {"command": shlex.join(cmd), "returncode": os.waitstatus_to_exitcode(status), "start": start,
            "stdout": stdout, "end": dt.datetime.now(dt.timezone.utc), "seconds": time.monotonic() - t0,
            "max_rss_kb": usage.ru_maxrss}


def _hms(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _timing_line(name: str, t: dict) -> str:
    return (f"- {name}: `{t['command']}` ({t['start']:%H:%M:%S}-{t['end']:%H:%M:%S} UTC): elapsed "
            f"{_hms(t['seconds'])}, peak RSS {t['max_rss_kb']:,} kB, exit {t['returncode']}")


def flat_tables(judgement: dict) -> list[str]:
    """flat_region.py's table for every model in a judgement.json (imports torch: call after the children)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from flat_region import flat_region_table

    lines = []
    for label, rows in judgement.get("flat_region", {}).items():
        path = judgement["shipped"] if label == "shipped" else judgement["candidates"].get(label, label)
        lines += ["", f"### {label} ({path})", "", *flat_region_table(rows)]
    return lines


def checks_md(run: Path, judge_t: dict, photos_t: dict, judgement: dict, torch_version: str) -> str:
    """The checks.md text: every model's flat-sky rows, the clean-photo tables, the timings."""
    lines = [f"# {run.name}: flat-sky and clean-photo checks ({judge_t['start']:%Y-%m-%d %H:%M}-"
             f"{photos_t['end']:%H:%M} UTC)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch_version}. "
             f"{MARK} {shlex.join(sys.argv[1:])}`; the decision is in judgement.md.", "",
             "## Flat sky (the judge's rows, from judgement.json)", *flat_tables(judgement), "",
             "## Clean photos", "", photos_t["stdout"].strip() or "(no output: see its exit code below)", "",
             "## Timings", "", _timing_line("judge", judge_t), _timing_line("clean photos", photos_t)]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a training folder or an unpacked GPU window (see above)")
    p.add_argument("--out", type=Path, required=True, help="the judgement folder, e.g. docs/runs/relay-10")
    p.add_argument("--reuse", action="append", type=Path, default=[], metavar="DIR",
                   help="passed to the judge: an earlier judgement folder, e.g. the shipped model's")
    p.add_argument("--shipped", default="default", help="the model to beat (default: the bundled one)")
    p.add_argument("--data_file_dir", type=Path, default=Path("../shared/datasets"))
    p.add_argument("--benchmarks", nargs="+", metavar="BENCHMARK", help="passed to the judge (default: its rows)")
    p.add_argument("--photos", type=Path, help="clean photos (default: DATA_FILE_DIR/denoising/cBSD68/original_png)")
    p.add_argument("--every", type=int, default=4, help="use every N-th photo")
    p.add_argument("--quiet", action="store_true", help="no progress bars in the judge")
    a = p.parse_args()
    photos = a.photos or a.data_file_dir / "denoising" / "cBSD68" / "original_png"
    if not a.run.is_dir():
        p.error(f"{a.run}: not a folder; pass a training folder or an unpacked GPU window")
    if a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} is a file; pass a folder")
    if a.every < 1:
        p.error("--every must be at least 1")
    if not photos.is_dir():
        p.error(f"--photos {photos}: not a folder; pass a folder of clean photographs")
    for d in a.reuse:
        if not d.is_dir():
            p.error(f"--reuse {d}: not a folder; pass an earlier judgement folder such as docs/runs/relay-8")
    checks = a.out / "checks.md"
    if checks.exists() and MARK not in checks.read_text(errors="replace"):
        print(f"error: {checks} was not written by this script (a record kept by hand?); it is left as it is: "
              "pass another --out", file=sys.stderr)
        return 1
    try:
        cands = candidates(a.run)
    except (EvaluationError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    py = sys.executable
    judge_t = timed([py, _script("scripts", "judge_relay.py"), *map(str, cands), "--shipped", a.shipped,
                     "--data_file_dir", str(a.data_file_dir), "--out", str(a.out),
                     *(["--benchmarks", *a.benchmarks] if a.benchmarks else []),
                     *[x for d in a.reuse for x in ("--reuse", str(d))], *(["--quiet"] if a.quiet else [])])
    sys.path.insert(0, str(ROOT / "scripts"))
    from judge_relay import read_json  # imports torch: only now, after the judge's RSS was taken

    recorded = a.out / "judgement.json"
    # only a judgement this judge wrote: a judge that stopped early leaves an earlier one in place
    judgement = read_json(recorded) if recorded.exists() and (
        recorded.stat().st_mtime >= judge_t["start"].timestamp()) else None
    if judgement is None:
        print(f"error: the judge exited {judge_t['returncode']} without a judgement (its message is above); "
              "nothing else was run", file=sys.stderr)
        return judge_t["returncode"] if judge_t["returncode"] in (1, 2) else 1
    # the clean photos after the judge, so that the judge's one-line refusals come at once
    photos_t = timed([py, _script("benchmarks", "clean_photos.py"), a.shipped, *map(str, cands), "--per_image",
                      "--photos", str(photos), "--every", str(a.every)], capture=True)
    print(photos_t["stdout"], end="", flush=True)

    import torch
    from moceir.pipeline import write_atomically

    text = checks_md(a.run, judge_t, photos_t, judgement, torch.__version__)
    write_atomically(checks, lambda tmp: tmp.write_text(text), overwrite=True)
    print(f"wrote {checks}")
    status = 0
    for name, t in (("the judge", judge_t), ("the clean-photo check", photos_t)):
        if t["returncode"] != 0:
            print(f"error: {name} exited {t['returncode']} (its messages are above)", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
