"""Lockstep: timed trainer processes that take turns step by step, so that the runs a ratio compares see the same
machine.

On this shared 2-core machine the speed of the same run drifts by 10-20 % over minutes (other tenants' load on the
shared cache and memory: the process's own CPU time grows with its wall time, with no more page faults or context
switches). Runs one after the other (`interleaved`, A B, B A, ...) each land in their own minutes, so a per-repeat
ratio carries that drift; five repeats could not tell a 2 % difference from it. In lockstep, the trainers of a
repeat run as separate processes at the same time, and each step of one follows a step of the other: one token
passes round a ring of named pipes (`ring`), a process steps only while it holds it, and passes it on when its next
step is due. The wait is a blocking read, so a waiting process takes no CPU and wakes no one: a wait that polled
every 2 ms slowed the stepping run by ~20 %, each wake-up preempting one of its two OpenMP threads while the other
waited for it at the next barrier. Each run keeps its own interpreter, allocator, heap and state, as a separate run
has; only the minutes are shared.

A neuclip_ds run is hooked at `PhaseTimer.reset`, which the training loop calls at the top of every step before it
starts the step's clock (neuclip_ds/train.py; once more when the engine builds its timer): the wait for the token is
not in `step_time_s`. The step after a run's last one never comes, so it keeps the token through its final save and
passes it on at exit (`finish`); a finished process is marked done in the ring's folder and skipped from then on.
Each take and pass is reported on stderr (`[lockstep] take|pass <index> <unix time>`), so a test can check that no
two steps overlapped.

    BENCH_LOCKSTEP=<ring folder>:<index>:<count>   (set by _common.train_lockstep for each process)
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

ENV = "BENCH_LOCKSTEP"
EVENT = re.compile(r"^\[lockstep\] (take|pass) (\d+) ([0-9.]+)$", re.MULTILINE)


def ring(folder: Path, count: int) -> Path:
    """A ring of `count` named pipes in `folder` (new, or empty): process i reads its turns from pipe i."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        os.mkfifo(folder / f"turn{i}")
    return folder


def spec(folder: Path, index: int, count: int) -> str:
    """The BENCH_LOCKSTEP value of process `index` of `count` on the ring in `folder`."""
    return f"{folder}:{index}:{count}"


class Turns:
    """This process's place in the ring. Process 0 holds the token first; the others wait for it."""

    def __init__(self, folder: str | Path, index: int, count: int) -> None:
        if not 0 <= index < count:
            raise ValueError(f"index: must be in [0, {count}), got {index}")
        self.folder, self.index, self.count = Path(folder), index, count
        # O_RDWR: opening a named pipe for reading alone would block until a writer opens it; our own write end
        # also keeps a token that was passed to us before we first read
        self.mine = os.open(self.folder / f"turn{index}", os.O_RDWR)
        self.holding, self.stepped = index == 0, False

    @classmethod
    def from_env(cls) -> Turns | None:
        value = os.environ.get(ENV)
        if not value:
            return None
        folder, index, count = value.rsplit(":", 2)
        return cls(folder, int(index), int(count))

    def _report(self, what: str) -> None:
        print(f"[lockstep] {what} {self.index} {time.time():.6f}", file=sys.stderr, flush=True)

    def next_step(self) -> None:
        """Before each step: pass the token on after this process's previous step, then wait for it to come back."""
        if self.stepped or not self.holding:  # process 0 starts with the token: its first step takes no turn
            if self.holding:
                self.pass_on()
            os.read(self.mine, 1)
            self.holding = True
        self.stepped = True
        self._report("take")

    def pass_on(self) -> None:
        """The token to the next process in the ring that has not finished (this one again if all others have)."""
        for k in range(1, self.count + 1):
            j = (self.index + k) % self.count
            if not (self.folder / f"done{j}").exists():
                self._report("pass")
                with open(self.folder / f"turn{j}", "wb", buffering=0) as pipe:
                    pipe.write(b"t")
                break
        self.holding = False

    def finish(self) -> None:
        """At exit: done from now on, and the token (if held) to the next process."""
        (self.folder / f"done{self.index}").touch()
        if self.holding:
            self.pass_on()


def hook_neuclip_steps(turns: Turns) -> None:
    """Make each neuclip_ds training step wait for its turn (see the module docstring)."""
    from neuclip_ds.engine import PhaseTimer

    reset = PhaseTimer.reset

    def reset_in_turn(timer: PhaseTimer) -> None:
        turns.next_step()
        reset(timer)

    PhaseTimer.reset = reset_in_turn


def events(stderr: str) -> list[tuple[str, int, float]]:
    """(take|pass, index, unix time) of each report in a process's stderr, in order."""
    return [(what, int(i), float(t)) for what, i, t in EVENT.findall(stderr)]


def checked_turns(stderrs: dict[str, str]) -> dict[str, int]:
    """{name: turns taken} of a ring's processes from their stderr; SystemExit if two of them ever held a turn at
    the same time (all reports in time order must read take i, pass i, take j, pass j, ..., the last take with no
    pass: the last process to finish keeps the token)."""
    merged = sorted((t, what, i) for text in stderrs.values() for what, i, t in events(text))
    for k, (t, what, i) in enumerate(merged):
        expected = "take" if k % 2 == 0 else "pass"
        if what != expected or (what == "pass" and i != merged[k - 1][2]):
            raise SystemExit(f"lockstep broken at {t:.6f}: {what} by process {i} where a {expected} was due")
    if merged and merged[-1][1] != "take":
        raise SystemExit("lockstep broken: the token was passed on after every process had finished")
    return {name: sum(what == "take" for what, _, _ in events(text)) for name, text in stderrs.items()}
