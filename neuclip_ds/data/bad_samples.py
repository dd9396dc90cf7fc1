"""Bad input: the reasons a sample or shard is skipped, their counting and warnings, and the one rule deciding
when there are too many of them for the run to go on.

Reasons (``BAD_REASONS``)
    ``missing_shard``    one per missing shard file (files already missing when the loader is built are
                         attributed to rank ``i % world_size``, i = position among the missing ones, so the sum
                         over ranks counts each once)
    ``shard_error``      one per tar read error (truncated or corrupt tar; the samples after the error point are
                         lost and cannot be counted)
    ``missing_image``, ``decode_error`` (image bytes PIL cannot decode), ``missing_caption``,
    ``empty_caption``    (blank after strip, or not utf-8), ``bad_json`` (unparsable json),
    ``missing_index``    no json ``index`` and a non-numeric key
    ``bad_index``        an index < 0, or >= ``dataset_size`` when the loader is given one (FastCLIP's u tables
                         have exactly that many rows)
    ``duplicate_key``    a key seen again later in the same shard read, adjacent or not: the first sample of the
                         key is kept, every later one is skipped and counted once

Each skip warns (``BadSampleWarning``, the first 20 per worker and epoch, then one "suppressed" note). The loader
delivers the counts in ``batch["bad_samples"]`` (see loader.py); ``BadSampleTracker.update(batch)`` sums them and
``check_bad_fraction`` is the abort rule, used by the tracker and by the trainer's step stream (stream.py).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping

BAD_REASONS = (
    "missing_shard",
    "shard_error",
    "missing_image",
    "decode_error",
    "missing_caption",
    "empty_caption",
    "bad_json",
    "missing_index",
    "bad_index",
    "duplicate_key",
)
# the bad fraction is judged only after this many samples (good + bad), so one early bad shard does not stop a run
MIN_SEEN = 100
_MAX_WARNINGS = 20


class BadSampleWarning(UserWarning):
    """A sample or shard was skipped (see the ``bad_samples`` counters)."""


class TooManyBadSamplesError(RuntimeError):
    """The fraction of skipped samples passed the configured threshold."""


class BadSample(Exception):
    """Raised by sample decoding: skip this sample and count it under ``reason``."""

    def __init__(self, reason: str, msg: str) -> None:
        super().__init__(msg)
        self.reason = reason


def merge_counts(into: Counter, counts: Mapping[str, int] | None) -> None:
    for k, v in (counts or {}).items():
        into[k] += int(v)


def check_bad_fraction(
    good: int, bad: int | Mapping[str, int], max_fraction: float | None, *, min_seen: int = MIN_SEEN
) -> None:
    """Raise ``TooManyBadSamplesError`` when ``bad / (bad + good)`` exceeds ``max_fraction`` (None: no limit) after
    at least ``min_seen`` samples. ``bad``: a total, or counts per reason (then named in the message)."""
    total = bad if isinstance(bad, int) else int(sum(bad.values()))
    seen = good + total
    fraction = total / seen if seen else 0.0
    if max_fraction is None or seen < min_seen or fraction <= max_fraction:
        return
    detail = "" if isinstance(bad, int) else ": " + ", ".join(f"{k}={v}" for k, v in sorted(bad.items()) if v)
    raise TooManyBadSamplesError(
        f"data: {total} of {seen} samples were bad ({fraction:.1%} > --max-bad-fraction "
        f"{max_fraction:.1%}){detail}; see the warnings above for which shards and why"
    )


class WorkerBadCounts:
    """One loader worker's bad-sample counts and its rate-limited warnings."""

    def __init__(self, where: str) -> None:
        self.counts: Counter = Counter()
        self.where = where
        self.warned = 0
        self.shard_seq: int | None = None  # which shard read of this worker is open (set by the loader)
        self._counted_shard: int | None = None

    def add(self, reason: str, msg: str) -> None:
        self.counts[reason] += 1
        self.warned += 1
        if self.warned <= _MAX_WARNINGS:
            warnings.warn(f"data: skipped ({reason}) {msg} [{self.where}]", BadSampleWarning, stacklevel=2)
        elif self.warned == _MAX_WARNINGS + 1:
            warnings.warn(
                f"data: more bad samples, further warnings suppressed [{self.where}]", BadSampleWarning, stacklevel=2
            )

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler: count and continue; one count per shard read (an error inside a tar
        is reported by webdataset twice: by the member loop and by the shard loop)."""
        shard = self.shard_seq
        if shard is not None and shard == self._counted_shard:
            return True
        self._counted_shard = shard
        reason = "missing_shard" if isinstance(exn, FileNotFoundError) else "shard_error"
        self.add(reason, repr(exn)[:300])
        return True  # continue

    def take(self) -> dict[str, int]:
        """The counts since the last take (shipped with the worker's next batch), then zero."""
        out = {k: int(v) for k, v in self.counts.items() if v}
        self.counts.clear()
        return out


class BadSampleTracker:
    """Sums ``batch["bad_samples"]`` and good samples of one process's batches.

    ``fraction = bad / (bad + good)`` where shard-level events (missing_shard, shard_error) count as one each.
    A training run decides on every rank's counts: ``LoaderStream.check_bad_samples`` all-reduces
    ``[good, total]`` and applies ``check_bad_fraction``. ``check``, ``as_dict`` and ``counts_vector`` see this
    process's counts only (one process: tests, single-process tools).
    """

    def __init__(self, max_fraction: float | None = None, *, min_seen: int = MIN_SEEN) -> None:
        self.max_fraction = max_fraction
        self.min_seen = int(min_seen)
        self.good = 0
        self.bad: Counter = Counter()

    def update(self, batch: dict) -> dict[str, int]:
        counts = batch.get("bad_samples") or {}
        merge_counts(self.bad, counts)
        if "key" in batch:
            self.good += len(batch["key"])
        elif "index" in batch:
            self.good += int(batch["index"].shape[0])
        return dict(counts)

    @property
    def total(self) -> int:
        return int(sum(self.bad.values()))

    @property
    def seen(self) -> int:
        return self.good + self.total

    @property
    def fraction(self) -> float:
        return self.total / self.seen if self.seen else 0.0

    def check(self, max_fraction: float | None = None) -> None:
        """``check_bad_fraction`` on this tracker's counts; ``max_fraction`` overrides the tracker's limit."""
        check_bad_fraction(
            self.good, self.bad, self.max_fraction if max_fraction is None else max_fraction, min_seen=self.min_seen
        )

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {"bad_samples": self.total, "good_samples": self.good, "bad_fraction": self.fraction}
        for k, v in sorted(self.bad.items()):
            out[f"bad_samples/{k}"] = int(v)
        return out

    def counts_vector(self) -> list[int]:
        extra = sorted(k for k in self.bad if k not in BAD_REASONS)
        return [self.good] + [int(self.bad.get(k, 0)) for k in BAD_REASONS + tuple(extra)]

    def state_dict(self) -> dict:
        return {"good": self.good, "bad": dict(self.bad)}

    def load_state_dict(self, state: dict) -> None:
        self.good = int(state.get("good", 0))
        self.bad = Counter({k: int(v) for k, v in state.get("bad", {}).items()})
