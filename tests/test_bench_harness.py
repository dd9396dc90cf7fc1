"""The timing benchmarks' harness (benchmarks/_common.py, benchmarks/_pinned.py): runs are interleaved A B C,
C B A, ... and every timed run keeps the thread counts it was given, checked from inside the run. No timing."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import PINNED, interleaved, median_spread, pinned_env  # noqa: E402
from _pinned import checked_threads  # noqa: E402


def test_runs_are_interleaved_abba():
    order = []
    results = interleaved({"a": None, "b": None, "c": None}, 3, lambda name, r: order.append((name, r)) or name * 2)
    assert order == [("a", 0), ("b", 0), ("c", 0), ("c", 1), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("c", 2)]
    assert results == {"a": ["aa"] * 3, "b": ["bb"] * 3, "c": ["cc"] * 3}


def test_median_spread():
    assert median_spread([1.0, 3.0, 2.0]) == "2.000 (1.000–3.000)"


def test_pinned_env_of_a_gpu_run_leaves_the_gpu_and_the_accelerator_alone(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cpu, gpu = pinned_env(2), pinned_env(2, gpu=True)
    assert cpu["DS_ACCELERATOR"] == "cpu" and cpu["CUDA_VISIBLE_DEVICES"] == ""
    assert "DS_ACCELERATOR" not in gpu and "CUDA_VISIBLE_DEVICES" not in gpu
    assert gpu["BENCH_THREADS"] == gpu["OMP_NUM_THREADS"] == "2"


def _pinned_run(tmp_path: Path, threads: int, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "probe_module.py").write_text(body)
    env = dict(pinned_env(threads), PYTHONPATH=str(tmp_path))
    return subprocess.run(
        [sys.executable, str(PINNED), "probe_module", "x"], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("leave", ["return", "os._exit"])
def test_pinned_sets_and_reports_threads(tmp_path, leave):
    """The module runs as __main__ with its argv and the pinned counts, and the exit report comes however it
    leaves (neuclip_ds.train leaves through os._exit)."""
    body = (
        "import os, sys, torch\n"
        "print(__name__, sys.argv[1:], torch.get_num_threads(), torch.get_num_interop_threads())\n"
        "sys.stdout.flush()\n" + ("os._exit(0)\n" if leave == "os._exit" else "")
    )
    proc = _pinned_run(tmp_path, 3, body)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["__main__", "['x']", "3", "3"]
    checked_threads(proc.stderr, 3, "probe")  # start and exit seen, both at 3


def test_a_run_that_changes_its_threads_is_refused(tmp_path):
    proc = _pinned_run(tmp_path, 2, "import torch\ntorch.set_num_threads(1)\n")
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(SystemExit, match=r"expected 2 .* saw \{'start': \(2, 2\), 'exit': \(1, 2\)\}"):
        checked_threads(proc.stderr, 2, "probe")
    with pytest.raises(SystemExit, match=r"saw \{\}"):
        checked_threads("no reports at all", 2, "probe")
