"""benchmarks/gpu_check.py (issue 16): its time guard, and its --dry-run on CPU (tiny preset, every code path:
ZeRO-2 and ZeRO-3, checkpointing, zero-init, the interleaved NeuCLIP / MBCL pair, the scale plan's prediction),
which must print a table with every row and finite numbers and write nothing under benchmarks/results."""

import math
import re
import sys

import pytest

from neuclip_ds.launch import REPO_ROOT, cpu_env, run_command

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
RESULT = REPO_ROOT / "benchmarks" / "results" / "gpu_check.md"
ROWS = (
    "NeuCLIP ZeRO-2",
    "NeuCLIP ZeRO-2 + ckpt",
    "NeuCLIP ZeRO-3",
    "NeuCLIP ZeRO-3 + ckpt",
    "MBCL ZeRO-2",
    "NeuCLIP ZeRO-3 + ckpt, zero-init on",
    "open_clip amp_bf16",
)


def gpu_check(*args: str, timeout: float):
    return run_command([sys.executable, str(SCRIPT), *args], env=cpu_env(1), timeout=timeout, check=False)


def test_an_estimate_past_max_minutes_stops_before_any_run():
    proc = gpu_check("--dry-run", "--max-minutes", "1", timeout=120)
    assert proc.returncode != 0
    assert "exceeds --max-minutes 1" in proc.stderr, proc.stderr[-2000:]
    estimate = re.search(r"estimate on a GPU of 989 bf16 TFLOPS: ([0-9.]+) min", proc.stdout)
    assert estimate and float(estimate.group(1)) > 1, proc.stdout
    assert "scale plan prediction" not in proc.stdout  # nothing ran


@pytest.fixture(scope="module")
def dry_run():
    before = RESULT.stat().st_mtime_ns if RESULT.exists() else None
    proc = gpu_check("--dry-run", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (RESULT.stat().st_mtime_ns if RESULT.exists() else None) == before  # a dry run writes nothing
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    return proc.stdout, {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in table)}


def number(cell: str) -> float:
    return float(re.match(r"[-+0-9.e]+", cell).group())


def test_dry_run_table_has_every_row_and_finite_numbers(dry_run):
    out, rows = dry_run
    assert tuple(rows) == ROWS, out
    assert "MFU against --peak-tflops 989" in out
    for name, (preset, batch, rate, mfu, peak, _vs) in rows.items():
        if rate in ("skipped", "not installed"):
            assert name in ("NeuCLIP ZeRO-3 + ckpt", "open_clip amp_bf16"), (name, rate)
            continue
        assert number(rate) > 0 and math.isfinite(number(rate)), (name, rate)
        assert mfu.endswith(" %") and 0 < number(mfu) < 100, (name, mfu)
        if name != "open_clip amp_bf16":
            assert preset == "tiny" and batch == "32"
            assert 0 < number(peak) < 64, (name, peak)
    ratio = re.fullmatch(r"NeuCLIP ÷ MBCL step time: ([0-9.]+) \(.*", rows["MBCL ZeRO-2"][-1])
    assert ratio and 0 < float(ratio.group(1)) < 100, rows["MBCL ZeRO-2"]
    plan = re.fullmatch(r"plan predicts ([0-9.]+) GiB; measured ÷ predicted: ([0-9.]+)", rows[ROWS[5]][-1])
    assert plan and float(plan.group(1)) >= 0 and math.isfinite(float(plan.group(2))), rows[ROWS[5]]
