"""Optimizer-step view of a training loader: per step, this rank's A micro-batches (A = gradient accumulation),
the epoch they belong to, a resumable position, and bad-sample accounting summed over all ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .. import distributed
from .bad_samples import MIN_SEEN, BadSampleTracker, check_bad_fraction
from .loader import ClipLoader

if TYPE_CHECKING:
    import torch


class StepStream(Protocol):
    """What the trainer and its checkpoints ask of the training data (`LoaderStream`, `synthetic.SyntheticStream`)."""

    epoch: int
    steps_per_epoch: int

    def next_step(self) -> list[dict]:
        """This rank's A micro-batches of the next optimizer step."""
        ...

    def check_bad_samples(self) -> int:
        """Bad samples skipped so far over all ranks (collective)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LoaderStream:
    def __init__(
        self,
        loader: ClipLoader,
        *,
        accumulation: int,
        max_bad_fraction: float,
        min_seen: int = MIN_SEEN,
        device: torch.device | str | None = None,
    ) -> None:
        """`device`: where the bad-sample all-reduce runs (the run's device: NCCL has no CPU tensors)."""
        self.loader, self.A, self.device = loader, accumulation, device
        self.steps_per_epoch = max(1, len(loader) // accumulation)
        self.tracker = BadSampleTracker(max_bad_fraction, min_seen=min_seen)
        self.epoch = loader.epoch
        self._iter = None

    def next_step(self) -> list[dict]:
        batches: list[dict] = []
        self.epoch = self.loader.epoch  # the epoch this step's first micro-batch comes from
        empty_epochs = 0
        while len(batches) < self.A:
            if self._iter is None:
                self._iter = iter(self.loader)
            batch = next(self._iter, None)
            if batch is None:  # end of an epoch: the loader has moved to the next one
                self._iter = None
                empty_epochs += 1
                if empty_epochs > 1:
                    raise RuntimeError("data: a whole epoch produced no batch (all shards unreadable?)")
                continue
            empty_epochs = 0
            self.tracker.update(batch)
            batches.append(batch)
        return batches

    def check_bad_samples(self) -> int:
        """Bad samples skipped so far over all ranks (one small all-reduce, so every rank decides alike);
        ``check_bad_fraction`` raises once they pass ``max_bad_fraction``."""
        counts = distributed.sum_over_ranks([self.tracker.good, self.tracker.total], self.device)
        good, bad = (int(x) for x in counts)
        check_bad_fraction(good, bad, self.tracker.max_fraction, min_seen=self.tracker.min_seen)
        return bad

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.tracker.load_state_dict(state["tracker"])
        self.epoch, self._iter = self.loader.epoch, None
