"""--profile-steps (neuclip_ds/profiling.py): torch.profiler over exactly the steps asked for, the engine's phases as
named ranges, files that a later --overwrite removes, and a profile written when the run stops inside the range."""

import json

import torch

from neuclip_ds.launch import launch
from neuclip_ds.profiling import StepProfiler, StepRange, read_ops
from neuclip_ds.rundir import previous_run, remove_previous_run

SYNTHETIC = ["--synthetic-samples", "64", "--global-batch-size", "16", "--ds-config", "zero1", "--lr", "1e-3"]


def test_a_run_profiles_exactly_the_asked_steps_with_its_phases(tmp_path):
    out = tmp_path / "run"
    proc = launch([*SYNTHETIC, "--steps", "4", "--profile-steps", "2:3", "--output-dir", str(out)], timeout=300)
    assert f"neuclip-train: profile of 2 step(s) in {out / 'profile'}" in proc.stderr, proc.stderr[-2000:]
    data = json.loads((out / "profile" / "rank0_ops.json").read_text())
    assert data["profiled_steps"] == 2
    ops = read_ops(out / "profile" / "rank0_ops.json")
    # one range per phase and step (the optimizer's two: DeepSpeed's step, then the temperature's clamp), so the
    # counts per step are whole: steps 1 and 4 were not profiled
    calls = {phase: ops[phase]["calls_per_step"] for phase in ("data", "forward", "gather", "npn", "backward")}
    assert calls == dict.fromkeys(calls, 1.0) and ops["optimizer"]["calls_per_step"] == 2.0
    assert any(name in ops for name in ("aten::mm", "aten::addmm", "aten::linear"))
    assert ops["npn"]["cpu_s_per_step"] > 0 and ops["forward"]["cpu_s_per_step"] > 0
    trace = json.loads((out / "profile" / "rank0_trace.json").read_text())
    forward_ranges = [e for e in trace["traceEvents"] if e.get("name") == "forward" and e.get("ph") == "X"]
    assert len(forward_ranges) == 2
    assert previous_run(out)[-1] == "profile/"
    assert "profile/" in remove_previous_run(out) and not (out / "profile").exists()


def test_a_run_stopped_inside_the_range_writes_what_it_profiled(tmp_path):
    profiler = StepProfiler(StepRange.parse("2:5"), tmp_path / "profile", rank=0, device=torch.device("cpu"))
    x = torch.randn(64, 64)
    for step in (1, 2, 3):  # the run ends after step 3
        profiler.begin(step)
        with torch.profiler.record_function("forward"):
            x = (x @ x).tanh()
        profiler.end(step)
    assert not (tmp_path / "profile").exists()  # still profiling: nothing written before the end
    profiler.close()
    ops = read_ops(tmp_path / "profile" / "rank0_ops.json")
    assert ops["forward"]["calls_per_step"] == 1.0 and ops["aten::mm"]["calls_per_step"] == 1.0
    assert json.loads((tmp_path / "profile" / "rank0_ops.json").read_text())["profiled_steps"] == 2
    profiler.close()  # a second close (the run's finally) does nothing


def test_no_range_profiles_nothing(tmp_path):
    profiler = StepProfiler(None, tmp_path / "profile", rank=0, device=torch.device("cpu"))
    profiler.begin(1)
    profiler.end(1)
    profiler.close()
    assert profiler.profiler is None and not (tmp_path / "profile").exists()
