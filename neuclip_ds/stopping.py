"""How a multi-rank run stops, whether it fails or is asked to stop.

A failure on one rank. The rank that hits an error counts it in the rendezvous store (the TCPStore at
MASTER_ADDR:MASTER_PORT that every rank already reached to form the process group), prints the cause as one line
if it is the first rank to fail, and leaves at once: no barrier and no process-group teardown, since the other
ranks may be waiting for it inside a collective that will never complete. The other ranks stop at the first of:
their own collective failing (gloo notices a closed peer), the launcher killing them (the DeepSpeed launcher,
torchrun and `srun --kill-on-bad-exit` do), or `FaultWatchdog` seeing the count (NCCL waits on a dead peer until
its timeout, and a rank may be in long local work such as an evaluation). They exit 1 without printing: the cause
was printed once, by the rank that hit it.

A stop request (preemption). SIGTERM (SLURM, Kubernetes), SIGUSR1 (`sbatch --signal`) or SIGINT (Ctrl-C) only set
a flag (`StopSignals`); the ranks agree on it at the next step boundary with one all-reduce, so that every rank
saves the same step, and the run leaves with exit code 0 (`launchers/` forward these signals to every rank).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from . import distributed

# per torchrun restart: its agent's store outlives the ranks of a failed attempt, and the next attempt starts clean
FAILED_RANKS_KEY = f"neuclip_ds/failed_ranks/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
WATCHDOG_POLL_S = 1.0
# set by this rank's FaultWatchdog once another rank's failure is counted: this rank's own error that follows is
# an echo of it (a collective that lost its peer) and is not printed
another_rank_failed = threading.Event()


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _rendezvous_store(timeout_s: float) -> dist.TCPStore | None:
    """A client of the store the process group was formed through; None for one rank or when it is gone (its host,
    rank 0, has exited)."""
    if not distributed.is_distributed():
        return None
    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
    except Exception:
        return None


def _is_first_failure() -> bool:
    """Count this rank's failure; True if no rank failed before it (or nobody can tell: then it speaks)."""
    store = _rendezvous_store(timeout_s=3)
    if store is None:
        return True
    try:
        return store.add(FAILED_RANKS_KEY, 1) == 1
    except Exception:
        return True


def report_failure(error: BaseException, *, debug: bool, expected: tuple[type, ...] = ()) -> int:
    """The failing rank's last words; returns the exit code (1). `expected`: errors that are a verdict on the run
    (e.g. too many skipped steps), printed as 'aborted' without their type; anything else is 'error on rank R'."""
    # before the process group exists (or after it failed to form) the launcher's RANK still names this rank
    rank = distributed.rank() if distributed.is_initialized() else int(os.environ.get("RANK", "0"))
    if (not another_rank_failed.is_set() and _is_first_failure()) or debug:
        if debug:
            traceback.print_exception(error)
        cause = str(error) if isinstance(error, expected) else f"error on rank {rank}: {one_line(error)}"
        # one write: with --debug every failing rank prints, and their lines must not interleave
        sys.stderr.write(f"neuclip-train: {'aborted: ' if isinstance(error, expected) else ''}{cause}\n")
        sys.stderr.flush()
    if rank == 0 and distributed.is_distributed():
        # rank 0 hosts the store: it stays long enough for every watchdog to read the count before the store goes
        time.sleep(2.5 * WATCHDOG_POLL_S)
    return 1


class FaultWatchdog:
    """Ends this rank within `grace_s` of another rank's failure, whatever this rank is doing at the time.

    A daemon thread polls the failure count every `poll_s` on its own store connection. The grace lets a rank whose
    collective has failed too reach `report_failure` by itself; after it the process exits with code 1. A store
    that stops answering means rank 0 (its host) is gone, which ends the run as well. `stop()` before the final
    barrier: after it, ranks leave at their own pace."""

    def __init__(self, *, poll_s: float = WATCHDOG_POLL_S, grace_s: float = 10.0) -> None:
        self.poll_s, self.grace_s = poll_s, grace_s
        self._stopped = threading.Event()
        self._store = _rendezvous_store(timeout_s=30)
        self._thread = threading.Thread(target=self._watch, name="neuclip-fault-watchdog", daemon=True)
        if self._store is not None:
            self._thread.start()

    def _another_rank_failed(self) -> bool:
        try:
            failed = self._store.add(FAILED_RANKS_KEY, 0) > 0
        except Exception:  # the store's host, rank 0, is gone
            return True
        if failed:
            another_rank_failed.set()
        return failed

    def _watch(self) -> None:
        noticed = None
        while not self._stopped.wait(self.poll_s):
            if noticed is None and self._another_rank_failed():
                noticed = time.monotonic()
            if noticed is not None and time.monotonic() - noticed > self.grace_s:
                os._exit(1)

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()


class StopSignals:
    """Records SIGTERM / SIGUSR1 / SIGINT instead of dying on them; `agreed()` at a step boundary tells every rank
    alike whether any rank received one. A second SIGINT interrupts at once (Ctrl-C twice)."""

    def __init__(self) -> None:
        self.received: int | None = None
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def agreed(self, device: torch.device) -> str | None:
        """Collective: the name of a signal some rank received (the same on every rank), or None."""
        signum = distributed.max_over_ranks(self.received or 0, device)
        return signal.Signals(signum).name if signum else None
