"""benchmarks/memory.py (issue 8.3), quick path of one piece: ZeRO-3 partitions what a rank holds.

The tiny preset on 1 and 2 CPU ranks (the deepspeed launcher, gloo), persistence threshold 0 as in --quick (else
tiny's small matrices stay replicated). The measured per-rank parameter bytes (param.ds_tensor storages) and the
model states (params + master + grads + Adam) at 2 ranks must be about half of 1 rank's. No timing assertions."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("memory_bench", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def zero3():
    bench = _load_benchmark()
    return {world: bench.measure_zero(3, world, preset="tiny", batch=2, persistence_threshold=0) for world in (1, 2)}


def test_zero3_two_ranks_hold_half_the_params(zero3):
    one = zero3[1][0]
    assert one["params"] >= 4 * one["total_params"]  # the whole fp32 model lives on the single rank
    for rank in zero3[2]:
        assert rank["params"] / one["params"] == pytest.approx(0.5, rel=0.1)


def test_zero3_two_ranks_hold_half_the_model_states(zero3):
    one = zero3[1][0]
    for rank in zero3[2]:
        assert rank["model_states"] / one["model_states"] == pytest.approx(0.5, rel=0.1)
        assert all(rank[c] > 0 for c in ("params", "master", "grads", "optim"))  # every category was found
