"""Run a Python module as `python -m MODULE ARGS...` would, with torch's intra- and inter-op thread counts set to
$BENCH_THREADS first and reported on stderr at start and at exit, so that a timing benchmark can check that every
trainer it compares ran on the threads it was given (a library that resets them would otherwise go unseen):

    BENCH_THREADS=2 python benchmarks/_pinned.py open_clip_train.main --model ViT-B-32 ...

With BENCH_LOCKSTEP set (`_lockstep.py`), a neuclip_ds run also takes its steps in turn with the other runs of
its ring, and passes its turn on when it exits. With BENCH_RUSAGE set (`_phase_rusage.py`), it reports each step's
resource use per phase.
"""

from __future__ import annotations

import atexit
import os
import re
import runpy
import sys

import torch
from _lockstep import Turns, hook_neuclip_steps
from _phase_rusage import ENV as RUSAGE_ENV
from _phase_rusage import hook_phase_rusage

REPORT = re.compile(r"^\[pinned\] (start|exit): intra-op (\d+), inter-op (\d+)$", re.MULTILINE)


def _report(when: str) -> None:
    print(
        f"[pinned] {when}: intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}",
        file=sys.stderr,
        flush=True,
    )


def checked_threads(output: str, threads: int, who: str) -> None:
    """SystemExit unless `output` holds the start and exit reports of a run that kept `threads` threads."""
    seen = {when: (int(intra), int(inter)) for when, intra, inter in REPORT.findall(output)}
    if set(seen) != {"start", "exit"} or any(v != (threads, threads) for v in seen.values()):
        raise SystemExit(f"{who}: expected {threads} intra-op and inter-op threads at start and exit, saw {seen}")


if __name__ == "__main__":
    threads = int(os.environ["BENCH_THREADS"])
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    turns = Turns.from_env()
    if turns is not None:
        hook_neuclip_steps(turns)
    # after the lockstep hook: a step's report is out before the wait for the next turn
    report_rusage = hook_phase_rusage() if os.environ.get(RUSAGE_ENV) else None
    _report("start")

    def _at_exit() -> None:
        if report_rusage is not None:
            report_rusage()
        _report("exit")
        if turns is not None:
            turns.finish()

    atexit.register(_at_exit)
    hard_exit = os._exit  # neuclip_ds.train leaves through os._exit, which skips atexit

    def _exit_reporting(code: int) -> None:
        _at_exit()
        hard_exit(code)

    os._exit = _exit_reporting
    runpy.run_module(module, run_name="__main__", alter_sys=True)
