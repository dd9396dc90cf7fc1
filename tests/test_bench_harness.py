"""The timing benchmarks' harness (benchmarks/_common.py, benchmarks/_pinned.py, benchmarks/_lockstep.py): runs are
interleaved A B C, C B A, ... or run in lockstep (no two steps at once), and every timed run keeps the thread
counts it was given, checked from inside the run. No timing."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import PHASES, PINNED, interleaved, median_spread, pinned_env, run_lockstep, train_lockstep  # noqa: E402
from _lockstep import checked_turns, events  # noqa: E402
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


# a stand-in for the training loop: the engine's PhaseTimer (whose reset opens every step), a few short steps,
# and a failure at a given step if asked; it reports the STEPPER_WHO it was given
STEPPER = """
import os, sys, time, torch
from neuclip_ds.engine import PhaseTimer
print("who", os.environ.get("STEPPER_WHO", "-"), file=sys.stderr)
timer = PhaseTimer(torch.device("cpu"))
for step in range(int(sys.argv[1])):
    timer.reset()
    if step == int(sys.argv[2]):
        raise RuntimeError("stepper failed at step " + sys.argv[2])
    time.sleep(0.02)
"""


def _steppers(tmp_path: Path, **steps_and_failure: tuple[int, int]) -> tuple[dict[str, list[str]], dict[str, str]]:
    (tmp_path / "stepper.py").write_text(STEPPER)
    env = dict(pinned_env(1), PYTHONPATH=str(tmp_path))
    cmds = {
        name: [sys.executable, str(PINNED), "stepper", str(n), str(fail)]
        for name, (n, fail) in steps_and_failure.items()
    }
    return cmds, env


def test_lockstep_runs_take_their_steps_in_turn(tmp_path):
    """Runs of different lengths: strictly one step at a time (take/pass alternate by the same process), each
    step of one after a step of the other while both run, and the longer run goes on alone once the other is done.
    Each gets its own `extra_env` on top of the shared environment."""
    cmds, env = _steppers(tmp_path, a=(4, -1), b=(7, -1))
    stderrs = run_lockstep(cmds, env, timeout=300, extra_env={"a": {"STEPPER_WHO": "A"}})
    assert "who A\n" in stderrs["a"] and "who -\n" in stderrs["b"]
    assert checked_turns(stderrs) == {"a": 5, "b": 8}  # the PhaseTimer's own reset at construction, then each step
    takes = [
        i for _, what, i in sorted((t, w, i) for text in stderrs.values() for w, i, t in events(text)) if what == "take"
    ]
    assert takes == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1, 1]


def test_overlapping_turns_are_refused():
    a = "[lockstep] take 0 1.0\n[lockstep] pass 0 3.0\n"
    b = "[lockstep] take 1 2.0\n"  # b stepped while a still held the token
    with pytest.raises(SystemExit, match=r"lockstep broken at 2\.000000: take by process 1 where a pass was due"):
        checked_turns({"a": a, "b": b})
    assert checked_turns({"a": a, "b": "[lockstep] take 1 4.0\n"}) == {"a": 1, "b": 1}


def test_a_failing_lockstep_run_stops_the_others(tmp_path):
    """b fails at its 3rd step while a waits for b's turn (for ever, unless the harness kills it): the error is
    b's, and it comes at once, not at the timeout."""
    cmds, env = _steppers(tmp_path, a=(50, -1), b=(50, 2))
    started = time.monotonic()
    with pytest.raises(SystemExit, match=r"(?s)^b: .* exited 1:.*stepper failed at step 2"):
        run_lockstep(cmds, env, timeout=240)
    assert time.monotonic() - started < 200


def test_lockstep_training_runs(tmp_path):
    """Two real tiny runs (MBCL and NeuCLIP): the hook holds every training step (train_lockstep checks the turns
    against the steps and that none overlapped), both runs finish with all their steps, and their checkpoints are
    gone when not kept. Each step's resource use per phase comes back with its row: every phase of the engine's
    timer, and CPU time in the NPN phase of the NeuCLIP run only."""
    args = "--preset tiny --synthetic-samples 48 --global-batch-size 16 --steps 3 --precision fp32".split()
    runs = {loss: ([*args, "--loss", loss], tmp_path / loss) for loss in ("mbcl", "neuclip")}
    rows = train_lockstep(runs, threads=1, keep_checkpoints=False, rusage=True)
    assert {loss: [r["step"] for r in rows[loss]] for loss in rows} == {"mbcl": [1, 2, 3], "neuclip": [1, 2, 3]}
    assert all((tmp_path / loss / "metrics.jsonl").exists() for loss in rows)
    assert not any((tmp_path / loss / "checkpoints").exists() for loss in rows)
    assert all(set(r["rusage"]) == set(PHASES) for loss in rows for r in rows[loss])
    assert all(r["rusage"]["forward"]["ru_utime"] > 0 for loss in rows for r in rows[loss])
    npn_cpu = {loss: sum(r["rusage"]["npn"]["ru_utime"] for r in rows[loss]) for loss in rows}
    assert npn_cpu["neuclip"] > 10 * npn_cpu["mbcl"], npn_cpu
