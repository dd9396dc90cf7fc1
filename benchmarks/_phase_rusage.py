"""Per-phase resource use of a neuclip_ds run's steps: page faults, user and kernel CPU time and context switches
of the whole process (all its threads, getrusage(2)) inside each of the engine's phase timers.

Wall time alone cannot tell a phase that computes more from one that waits on memory the kernel has to fault in
and zero (minor faults, kernel time), on other threads (voluntary switches) or on the machine's other tenants
(involuntary switches). Two runs whose phases differ in wall time but not here did the same work at different
speeds.

With BENCH_RUSAGE set, `_pinned.py` hooks `PhaseTimer.__call__` (each phase's counters) and `PhaseTimer.reset`
(the top of every step: the step just ended is reported on stderr as `[rusage] {phase: {field: delta}}`, one JSON
line per step; the last step's at exit). `_common.train_lockstep` attaches them to the metrics rows.
"""

from __future__ import annotations

import json
import re
import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

ENV = "BENCH_RUSAGE"
FIELDS = ("ru_minflt", "ru_majflt", "ru_utime", "ru_stime", "ru_nvcsw", "ru_nivcsw")
LINE = re.compile(r"^\[rusage\] (\{.*\})$", re.MULTILINE)


def hook_phase_rusage() -> Callable[[], None]:
    """Count each phase's resource use; returns the function that reports the step in progress (call it at exit)."""
    from neuclip_ds.engine import PhaseTimer

    step: dict[str, dict[str, float]] = {}
    timed, reset = PhaseTimer.__call__, PhaseTimer.reset

    @contextmanager
    def counted(timer: PhaseTimer, phase: str) -> Iterator[None]:
        before = resource.getrusage(resource.RUSAGE_SELF)
        try:
            with timed(timer, phase):
                yield
        finally:
            after = resource.getrusage(resource.RUSAGE_SELF)
            sums = step.setdefault(phase, dict.fromkeys(FIELDS, 0))
            for field in FIELDS:
                sums[field] += getattr(after, field) - getattr(before, field)

    def report() -> None:
        if step:  # the engine's first reset, before any step, has nothing to report
            print(f"[rusage] {json.dumps(step)}", file=sys.stderr, flush=True)
            step.clear()

    def reset_reporting(timer: PhaseTimer) -> None:
        report()
        reset(timer)

    PhaseTimer.__call__, PhaseTimer.reset = counted, reset_reporting
    return report


def per_step(stderr: str) -> list[dict[str, dict[str, float]]]:
    """The `[rusage]` reports of a run's stderr, one per step in order."""
    return [json.loads(m) for m in LINE.findall(stderr)]
