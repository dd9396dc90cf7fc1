"""`--profile-steps FIRST:LAST`: torch.profiler over a range of training steps, written to <output-dir>/profile/.

Each rank writes
    rank{r}_trace.json   the Chrome trace of the profiled steps (chrome://tracing or ui.perfetto.dev); the engine's
                         phases (data, forward, gather, npn, backward, optimizer) appear as named ranges in it
    rank{r}_ops.json     per operator: calls, self time and total time, per profiled step (machine-readable, what
                         benchmarks/npn_overhead.py --profile compares between two losses)
and rank 0 also prints where the file went. Step numbers are those of metrics.jsonl (1-based); steps outside the
range run with no profiler at all. A run that stops before LAST writes what it profiled when it stops.
"""

from __future__ import annotations

import json
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

STEP_RANGE = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class StepRange:
    """Steps FIRST..LAST (1-based, inclusive)."""

    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> StepRange:
        """'FIRST:LAST' with 1 <= FIRST <= LAST; ValueError otherwise (the message names the rule)."""
        match = STEP_RANGE.match(text.strip())
        if match is None:
            raise ValueError(f"expected FIRST:LAST (step numbers, e.g. 5:8), got {text!r}")
        first, last = int(match[1]), int(match[2])
        if not 1 <= first <= last:
            raise ValueError(f"need 1 <= FIRST <= LAST, got {text!r}")
        return cls(first, last)

    @property
    def count(self) -> int:
        return self.last - self.first + 1


class StepProfiler:
    """Call `begin(step)` before and `end(step)` after each training step (step: 1-based); `close()` when training
    ends, however it ends. With no range it does nothing."""

    def __init__(self, steps: StepRange | None, out_dir: Path, rank: int, device: torch.device) -> None:
        self.steps, self.out_dir, self.rank = steps, out_dir, rank
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler: torch.profiler.profile | None = None
        self.profiled = 0

    def begin(self, step: int) -> None:
        if self.steps is not None and step == self.steps.first and self.profiler is None:
            self.profiler = torch.profiler.profile(activities=self.activities)
            self.profiler.__enter__()

    def end(self, step: int) -> None:
        if self.profiler is None:
            return
        self.profiled += 1
        if step >= self.steps.last:
            self.close()

    def close(self) -> None:
        """Stop profiling (if on) and write this rank's files."""
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        if self.profiled == 0:  # stopped inside its first step: nothing whole to report
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.out_dir / f"rank{self.rank}_trace.json"))
        ops = operator_table(profiler.key_averages(), self.profiled)
        path = self.out_dir / f"rank{self.rank}_ops.json"
        path.write_text(json.dumps({"profiled_steps": self.profiled, "ops": ops}, indent=1))
        if self.rank == 0:
            print(f"neuclip-train: profile of {self.profiled} step(s) in {self.out_dir}", file=sys.stderr, flush=True)


def operator_table(averages: typing.Iterable, steps: int) -> list[dict]:
    """Per operator of a profiler's key_averages(): calls, self and total CPU (and device) seconds, each per step;
    sorted by self time, largest first."""
    rows = []
    for event in averages:
        device_self = getattr(event, "self_device_time_total", 0.0)  # absent with no device activity
        rows.append(
            {
                "name": event.key,
                "calls_per_step": event.count / steps,
                "self_cpu_s_per_step": event.self_cpu_time_total / 1e6 / steps,
                "cpu_s_per_step": event.cpu_time_total / 1e6 / steps,
                "self_device_s_per_step": device_self / 1e6 / steps,
            }
        )
    return sorted(rows, key=lambda r: -(r["self_cpu_s_per_step"] + r["self_device_s_per_step"]))


def read_ops(path: str | Path) -> dict[str, dict]:
    """A rank{r}_ops.json as {operator: its row}."""
    data = json.loads(Path(path).read_text())
    return {row["name"]: row for row in data["ops"]}
