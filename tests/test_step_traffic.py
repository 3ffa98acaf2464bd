"""benchmarks/step_traffic.py (issue 14): the eager byte count of a training step, on the meta device."""

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
