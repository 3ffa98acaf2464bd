"""benchmarks/step_traffic.py and compile_time.py (issue 14): the eager byte count of a training step on real CPU
tensors, compile_time.py's reproducible eager steps, and one-line usage errors for sizes a step cannot take."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from step_traffic import eager_count  # noqa: E402


def _total(counters) -> int:
    return sum(sum(c.bytes.values()) for c in counters)


@pytest.mark.parametrize("fft_impl", ["fft", "matmul"])
def test_the_count_is_linear_in_the_batch_and_splits_extern_from_fusable(fft_impl):
    (fb2, opt2), (fb4, opt4) = (eager_count("MoCE_IR_tiny", b, 32, fft_impl) for b in (2, 4))
    ext, rest = fb2.split()
    assert ext > 0 and rest > 0 and ext + rest == sum(fb2.bytes.values())
    assert fb2.calls["convolution"] > 0 and fb2.calls["convolution_backward"] > 0
    assert sum(opt2.bytes.values()) == sum(opt4.bytes.values()) > 0  # AdamW does not depend on the batch
    assert 1.9 < sum(fb4.bytes.values()) / sum(fb2.bytes.values()) < 2.01
    assert "view" not in fb2.bytes and "permute" not in fb2.bytes  # views move nothing


def test_bypassed_experts_move_fewer_bytes():
    full, bypassed = (_total(eager_count("MoCE_IR_tiny", 2, 32, "fft", bypass=b)) for b in (False, True))
    assert bypassed < 0.95 * full


def test_bf16_runs_on_the_cpu_and_moves_fewer_bytes():
    fp32, bf16 = (_total(eager_count("MoCE_IR_tiny", 2, 32, "matmul", bf16=b)) for b in (False, True))
    assert bf16 < 0.8 * fp32


def test_compile_time_steps_are_reproducible_so_its_loss_check_means_something():
    """benchmarks/compile_time.py compares compiled losses with eager ones: two eager runs must agree exactly."""
    from compile_time import losses_and_times
    from step_traffic import build

    runs = [losses_and_times(*build("MoCE_IR_tiny", "matmul"), 2, 16, 2)[0] for _ in range(2)]
    assert runs[0] == runs[1] and all(math.isfinite(x) for x in runs[0])


@pytest.mark.parametrize("script, args, message", [
    ("step_traffic.py", ["--batch_size", "0"], "--batch_size must be at least 1 and --patch_size a positive multiple "
                                               "of 8; got 0 and 128"),
    ("step_traffic.py", ["--patch_size", "12"], "got 1 and 12"),
    ("step_traffic.py", ["--per", "0"], "--per must be at least 1, got 0"),
    ("step_traffic.py", ["--model", "X"], "--model 'X' is not a preset; choose one of MoCE_IR_S"),
    ("compile_time.py", ["--patch_size", "12"], "got 2 and 12"),
    ("compile_time.py", ["--steps", "1"], "--steps must be at least 2 (the first compiles), got 1"),
])
def test_bad_sizes_are_one_line_usage_errors(script, args, message):
    res = subprocess.run([sys.executable, script, *args], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert message in res.stderr.strip().splitlines()[-1]
