"""The webdataset loader for CLIP training and evaluation: shards -> (shuffle) -> decode/validate -> transform ->
batches, with a resumable data position.

``make_train_loader`` / ``make_eval_loader`` -> ``ClipLoader``. Shard specs are expanded by ``shards.expand_shards``
(the expansion run validation uses too); local shard files that are missing or unreadable are dropped with a
warning and counted (``missing_shard``). Tar reading and grouping use webdataset with a counting warn-and-continue
handler, so no worker ever dies on bad input (the reasons: bad_samples.py).

Batch format (a dict)
    ``pixel_values``   float32 [b, 3, S, S], CLIP mean/std normalized (transforms.py)
    ``input_ids``      int64 [b, context_length] (bos + tokens + eos + pad, see tokenizer.py)
    ``attention_mask`` int64 [b, context_length]
    ``index``          int64 [b]: json ``"index"`` of the sample, else ``int(key)`` when the key is all digits
    ``key``            list[str] of sample keys
    ``caption``        list[str] of the raw captions
    ``labels``         (only when every sample's json has a ``"labels"`` dict, e.g. the embedded val split)
                       dict attribute -> int64 [b]
    ``bad_samples``    dict reason -> int: samples (or shard-level events) skipped on this rank since the
                       previous batch this loader yielded (all workers merged, see ``ClipLoader``)
    ``num_truncated``  int: captions of this batch truncated to the context length
"""

from __future__ import annotations

import io
import json
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from .. import distributed
from .bad_samples import BadSample, BadSampleWarning, WorkerBadCounts, merge_counts
from .shards import expand_shards, is_local, local_path
from .transforms import ImageTransform, to_rgb

if TYPE_CHECKING:
    from .tokenizer import TextTokenizer

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "text", "caption")


def _open_shards(urls: Iterable[dict], stats: WorkerBadCounts) -> Iterator[dict]:
    """Open each shard (local files directly, other URLs with webdataset's gopen) and close it once the
    consumer moves on; yields ``{"url", "stream"}`` as webdataset's tar expander expects."""
    from webdataset.gopen import gopen

    for seq, item in enumerate(urls):
        url = item["url"]
        stats.shard_seq = seq
        try:
            stream = open(local_path(url), "rb") if is_local(url) else gopen(url)  # noqa: SIM115 (closed below)
        except Exception as exn:
            exn.args = (*exn.args, url)
            stats.handler(exn)
            continue
        try:
            yield dict(item, stream=stream)
        finally:
            stream.close()


def _skip_repeated_keys(members: Iterable[dict], stats: WorkerBadCounts) -> Iterator[dict]:
    """Tar members -> the same, less those of a sample whose key already had one earlier in this shard read.

    A repeat is counted (``duplicate_key``) and skipped whole, so the first sample of a key is the one used:
    webdataset's grouping would yield a non-adjacent repeat as a second sample (twice in an epoch, with the same
    FastCLIP index) and merge an adjacent one into the first. A member whose extension the current sample already
    has starts the adjacent repeat. Runs between webdataset's tar expander and its grouping."""
    from webdataset.tariterators import base_plus_ext

    shard, done, current, exts, skipping = None, set(), None, set(), False
    for member in members:
        if member and stats.shard_seq != shard:  # keys are unique per shard: a new read starts afresh
            shard, done, current = stats.shard_seq, set(), None
        key, ext = base_plus_ext(member["fname"]) if member else (None, None)
        if key is None:  # webdataset's end-of-shard marker, or a name it ignores
            yield member
            continue
        ext = ext.lower()  # as webdataset's grouping compares them
        if key != current or ext in exts:
            if current is not None:
                done.add(current)
            current, exts, skipping = key, set(), key in done
            if skipping:
                stats.add(
                    "duplicate_key",
                    f"{key} in {member.get('__url__', '?')} (a sample of this key came "
                    f"earlier in the shard; that one is kept)",
                )
        exts.add(ext)
        if not skipping:
            yield member


def _first(sample: dict, exts: Sequence[str]):
    for ext in exts:
        if ext in sample and sample[ext] is not None:
            return sample[ext]
    return None


def _sample_index(meta: dict, key: str, where: str, dataset_size: int | None) -> int:
    """The json ``index``, else the all-digit key; it must address a row of FastCLIP's u tables."""
    index = meta.get("index")
    if isinstance(index, bool) or not isinstance(index, int):
        base = key.rsplit("/", 1)[-1]
        if index is None and base.isdigit():
            index = int(base)
        else:
            raise BadSample("missing_index", where)
    if index < 0 or (dataset_size is not None and index >= dataset_size):
        bound = "" if dataset_size is None else f", the data set has {dataset_size}"
        raise BadSample("bad_index", f"{where} (index {index}{bound})")
    return index


def decode_sample(
    sample: dict, transform: ImageTransform, rng: random.Random | None, dataset_size: int | None = None
) -> dict:
    """Validate and decode one raw webdataset sample; raises BadSample(reason) when it must be skipped.
    ``dataset_size``: indices must lie in [0, dataset_size) (else only >= 0)."""
    key = str(sample.get("__key__", "?"))
    where = f"{key} in {sample.get('__url__', '?')}"
    raw_txt = _first(sample, TEXT_EXTS)
    if raw_txt is None:
        raise BadSample("missing_caption", where)
    try:
        caption = raw_txt.decode("utf-8") if isinstance(raw_txt, (bytes, bytearray)) else str(raw_txt)
    except UnicodeDecodeError:
        raise BadSample("empty_caption", f"{where} (caption is not utf-8)") from None
    caption = caption.strip()
    if not caption:
        raise BadSample("empty_caption", where)
    meta: dict = {}
    if sample.get("json") is not None:
        try:
            meta = json.loads(sample["json"])
            if not isinstance(meta, dict):
                raise ValueError("json is not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadSample("bad_json", f"{where}: {exc}") from None
    index = _sample_index(meta, key, where, dataset_size)
    raw_img = _first(sample, IMAGE_EXTS)
    if raw_img is None:
        raise BadSample("missing_image", where)
    try:
        with Image.open(io.BytesIO(raw_img)) as im:
            im.load()
            img = to_rgb(im)
    except Exception as exc:
        raise BadSample("decode_error", f"{where}: {exc!r}"[:300]) from None
    out = {"pixel_values": transform(img, rng), "caption": caption, "index": index, "key": key}
    labels = meta.get("labels")
    if isinstance(labels, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        out["labels"] = labels
    return out


class ShardStream(IterableDataset):
    """The per-rank stream of ready batches (runs inside each DataLoader worker). Prefer the loader factories.

    Non-resampled (the default): each epoch the full shard list is permuted with an RNG seeded by (seed, epoch),
    identical on all ranks; rank r takes shards ``[r::world_size]`` and dataloader worker w of that rank takes
    ``[w::workers]`` of those, so every sample of every readable shard is read exactly once per epoch across all
    ranks and workers. A sample shuffle buffer and the random-resized-crop RNG are seeded by (seed, epoch, rank,
    worker). Batches are formed inside the worker and ``DataLoader`` returns them round-robin over workers, so the
    batch sequence of a rank is a deterministic function of (shards, seed, epoch, rank, world_size, workers,
    batch_size). Ranks may get different numbers of batches when shards hold different numbers of samples; the
    last batch of each worker is partial unless ``drop_last``.
    Resampled: each worker draws shards with replacement (RNG seeded by seed, epoch, rank, worker) for exactly its
    share of ``batches_per_epoch`` full batches, the same number on every rank.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        tokenizer: TextTokenizer,
        transform: ImageTransform,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        shuffle_initial: int = 100,
        drop_last: bool = False,
        batches_per_epoch: int | None = None,
        dataset_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError("data: batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"data: rank {rank} not in [0, {world_size})")
        if resampled and not batches_per_epoch:
            raise ValueError("data: resampled mode needs num_samples (batches per epoch)")
        self.urls = list(urls)
        self.tokenizer = tokenizer
        self.transform = transform
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle, self.resampled = bool(shuffle), bool(resampled)
        self.shuffle_buffer, self.shuffle_initial = int(shuffle_buffer), int(shuffle_initial)
        self.drop_last = bool(drop_last)
        self.batches_per_epoch = batches_per_epoch
        self.dataset_size = dataset_size
        self.epoch = 0

    def _rng(self, worker: int, what: str) -> random.Random:
        return random.Random(f"neuclip:{self.seed}:{self.epoch}:{self.rank}:{worker}:{what}")

    def shards_for(self, worker: int, num_workers: int) -> list[str]:
        """Non-resampled: the shards this (rank, worker) reads in the current epoch, in order."""
        order = list(self.urls)
        if self.shuffle:
            random.Random(f"neuclip:{self.seed}:{self.epoch}:shards").shuffle(order)
        return order[self.rank :: self.world_size][worker::num_workers]

    def worker_quota(self, worker: int, num_workers: int) -> int | None:
        if not self.resampled:
            return None
        base, rem = divmod(self.batches_per_epoch, num_workers)
        return base + (1 if worker < rem else 0)

    def _shard_source(self, worker: int, num_workers: int, state: dict) -> Iterator[dict]:
        if not self.resampled:
            for url in self.shards_for(worker, num_workers):
                yield {"url": url}
            return
        rng = self._rng(worker, "resample")
        limit = 2 * len(self.urls) + 10
        while True:
            if state["shards_since_good"] >= limit:
                warnings.warn(
                    f"data: {limit} shards in a row gave no usable sample; ending this worker's epoch "
                    f"early (rank {self.rank}, worker {worker})",
                    BadSampleWarning,
                    stacklevel=2,
                )
                return
            state["shards_since_good"] += 1
            yield {"url": rng.choice(self.urls)}

    def _collate(self, samples: list[dict], stats: WorkerBadCounts) -> dict[str, Any]:
        text, truncated = self.tokenizer.encode_batch([s["caption"] for s in samples])
        batch = {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
            "key": [s["key"] for s in samples],
            "caption": [s["caption"] for s in samples],
        }
        if all("labels" in s for s in samples):
            names = samples[0]["labels"].keys()
            if all(s["labels"].keys() == names for s in samples):
                batch["labels"] = {k: torch.tensor([s["labels"][k] for s in samples], dtype=torch.long) for k in names}
        batch["bad_samples"] = stats.take()
        batch["num_truncated"] = int(truncated)
        return batch

    def __iter__(self) -> Iterator[dict]:
        from webdataset.filters import shuffle as wds_shuffle
        from webdataset.tariterators import group_by_keys, tar_file_expander

        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stats = WorkerBadCounts(f"rank {self.rank} worker {worker} epoch {self.epoch}")
        state = {"shards_since_good": 0}
        quota = self.worker_quota(worker, num_workers)
        if quota == 0:
            return
        streams = _open_shards(self._shard_source(worker, num_workers, state), stats)
        members = _skip_repeated_keys(tar_file_expander(streams, handler=stats.handler), stats)
        samples: Iterable[dict] = group_by_keys(members, handler=stats.handler)
        if self.shuffle and self.shuffle_buffer > 1:
            samples = wds_shuffle(self.shuffle_buffer, self.shuffle_initial, rng=self._rng(worker, "samples"))(samples)
        aug_rng = self._rng(worker, "augment")
        pending: list[dict] = []
        produced = 0
        for raw in samples:
            try:
                pending.append(decode_sample(raw, self.transform, aug_rng, self.dataset_size))
            except BadSample as bad:
                stats.add(bad.reason, str(bad))
                continue
            state["shards_since_good"] = 0
            if len(pending) == self.batch_size:
                yield self._collate(pending, stats)
                pending = []
                produced += 1
                if quota is not None and produced >= quota:
                    return
        if pending and not self.drop_last and quota is None:
            yield self._collate(pending, stats)
        leftover = stats.take()
        if leftover:
            yield {"__stats_only__": True, "bad_samples": leftover}


class ClipLoader:
    """Iterable over one epoch of batches of this rank; keeps the data position and bad-sample totals.

    Attributes: ``num_batches`` (nominal batches per epoch for this rank, exact in resampled mode; also
    ``len(loader)``), ``num_samples``, ``epoch``, ``batches_in_epoch``, ``bad_sample_totals`` (Counter over
    the loader's lifetime), ``urls``, ``missing_shards``.

    Bad-sample counts: each worker counts locally and ships its counts with its next batch (or, after its last
    batch, in a stats-only item that the loader absorbs); the loader merges them into the ``bad_samples`` field of
    the batch it yields, so the sum of ``batch["bad_samples"]`` over all batches of a rank is that rank's total.
    Counts that arrive when no batch follows are carried to the next epoch's first batch and are always visible in
    ``bad_sample_totals``.

    Iterating the loader runs the current epoch to its end and then advances to the next epoch.
    """

    def __init__(
        self,
        stream: ShardStream,
        *,
        workers: int = 0,
        num_samples: int | None = None,
        missing_shards: Sequence[str] = (),
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        epoch: int = 0,
    ) -> None:
        self.stream = stream
        self.workers = int(workers)
        self.num_samples = num_samples
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.urls = stream.urls
        self.missing_shards = list(missing_shards)
        self.epoch = int(epoch)
        self.batches_in_epoch = 0
        self._attached: Counter = Counter()  # counts handed out in batches
        self._pending: Counter = Counter()
        # every rank expands the same spec and finds the same: rank 0 says it for all of them
        if self.missing_shards and distributed.rank() == 0:
            warnings.warn(
                f"data: skipped (missing_shard) {len(self.missing_shards)} of "
                f"{len(self.urls) + len(self.missing_shards)} "
                f"shard file(s) missing or unreadable, skipped: {self.missing_shards[:5]}"
                f"{' ...' if len(self.missing_shards) > 5 else ''}",
                BadSampleWarning,
                stacklevel=3,
            )
        # attribute missing shard i to rank i % world_size, so summing over ranks counts each once
        mine = len(self.missing_shards[stream.rank :: stream.world_size])
        if mine:
            self._pending["missing_shard"] += mine
        gb = stream.batch_size * stream.world_size
        if stream.resampled:
            self.num_batches = stream.batches_per_epoch
            self._sample_cap = None
        elif num_samples is not None:
            self.num_batches = max(1, (num_samples // gb) if stream.drop_last else -(-num_samples // gb))
            self._sample_cap = -(-int(num_samples) // stream.world_size)
        else:
            self.num_batches = None
            self._sample_cap = None
        few = not stream.resampled and len(self.urls) < stream.world_size * max(1, self.workers)
        if few and distributed.rank() == 0:
            warnings.warn(
                f"data: {len(self.urls)} shard(s) for {stream.world_size} rank(s) x "
                f"{max(1, self.workers)} worker(s): some workers get no shard",
                stacklevel=3,
            )

    @property
    def bad_sample_totals(self) -> Counter:
        """All bad counts of this loader so far: those handed out in batches plus those still pending."""
        return self._attached + self._pending

    # -- position ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Batches already yielded, counted when a batch is handed out so a checkpoint saved after training on it
        is exact; after the last batch of epoch e it reads ``{"epoch": e + 1, "batches_in_epoch": 0}``."""
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """On a freshly built loader with the same arguments, the next ``iter`` replays the epoch from its start
        and drops the batches already yielded, so it continues with exactly the batches (pixels included) an
        uninterrupted run would have produced."""
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state.get("batches_in_epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``; a no-op when it is the current one, so a resumed position survives the usual
        ``set_epoch`` at the top of an epoch loop."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.batches_in_epoch = 0

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("data: length unknown (pass num_samples)")
        return self.num_batches

    # -- iteration ---------------------------------------------------------------------------------------------
    def _raw_items(self, epoch: int) -> Iterator[dict]:
        self.stream.epoch = epoch  # picked up by the workers, which are started per epoch
        if self.workers <= 0:
            return iter(self.stream)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return iter(
            DataLoader(
                self.stream,
                batch_size=None,
                num_workers=self.workers,
                persistent_workers=False,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor,
            )
        )

    def _real_batches(self, items: Iterator[dict], counts: Counter) -> Iterator[dict]:
        """Real batches only; stats-only items are merged into ``counts`` (shared with the caller)."""
        for item in items:
            if item.get("__stats_only__"):
                merge_counts(counts, item["bad_samples"])
                continue
            merge_counts(counts, item.pop("bad_samples", None))
            yield item

    def __iter__(self) -> Iterator[dict]:
        epoch, skip = self.epoch, self.batches_in_epoch
        counts: Counter = Counter()  # bad counts seen since the last yielded (or skipped) batch
        batches = self._real_batches(self._raw_items(epoch), counts)
        seen = samples = 0
        cur = next(batches, None)
        while cur is not None:
            seen += 1
            samples += len(cur["key"])
            # resampled or drop_last: at most len(self) batches (the trainer counts its steps per epoch from it)
            exact = self.stream.resampled or self.stream.drop_last
            capped = (self.num_batches is not None and exact and seen >= self.num_batches) or (
                self._sample_cap is not None and samples >= self._sample_cap
            )
            nxt = None if capped else next(batches, None)  # look ahead: know whether cur ends the epoch
            if seen <= skip:  # already consumed before the checkpoint
                counts.clear()
                cur = nxt
                continue
            merge_counts(self._pending, counts)
            counts.clear()
            cur["bad_samples"] = {k: v for k, v in sorted(self._pending.items()) if v}
            merge_counts(self._attached, cur["bad_samples"])
            self._pending.clear()
            if nxt is None:
                self.epoch, self.batches_in_epoch = epoch + 1, 0
            else:
                self.batches_in_epoch = seen
            yield cur
            cur = nxt
        # epoch ended without a batch to carry late counts: keep them for the next batch
        merge_counts(self._pending, counts)
        if self.epoch == epoch:
            self.epoch, self.batches_in_epoch = epoch + 1, 0


def _check_common(batch_size: int, world_size: int, rank: int, image_size: int, dataset_size: int | None) -> None:
    if batch_size < 1 or image_size < 1:
        raise ValueError("data: batch_size and image_size must be >= 1")
    if dataset_size is not None and dataset_size < 1:
        raise ValueError(f"data: dataset_size must be >= 1, got {dataset_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"data: rank {rank} / world_size {world_size} invalid")


def make_train_loader(
    shards: str | Sequence[str],
    *,
    tokenizer: TextTokenizer,
    image_size: int,
    batch_size: int,
    num_samples: int | None,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    seed: int = 0,
    resampled: bool = False,
    epoch: int = 0,
    shuffle_buffer: int = 1000,
    shuffle_initial: int = 100,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    drop_last: bool = False,
    pin_memory: bool = False,
    dataset_size: int | None = None,
) -> ClipLoader:
    """Training loader for this rank (``batch_size`` per rank; distribution and determinism: ``ShardStream``).

    ``num_samples`` (per epoch, all ranks together): non-resampled, it caps a rank at ``ceil(num_samples /
    world_size)`` samples (stopping after the batch that reaches the cap; set it >= the data size to read
    everything once), and with ``drop_last`` also at ``len(loader)`` = ``max(1, num_samples // (batch_size *
    world_size))`` batches; resampled, an epoch is exactly ``max(1, num_samples // (batch_size * world_size))`` full
    batches per rank, split exactly over the workers, the same on every rank (for multi-rank training, where
    every rank must take the same number of steps). ``dataset_size``: samples whose index is not below it are
    skipped (``bad_index``)."""
    _check_common(batch_size, world_size, rank, image_size, dataset_size)
    urls, missing = expand_shards(shards)
    batches = None
    if resampled:
        if not num_samples or num_samples < 1:
            raise ValueError("data: resampled mode needs num_samples >= 1")
        batches = max(1, int(num_samples) // (batch_size * world_size))
    stream = ShardStream(
        urls,
        tokenizer=tokenizer,
        transform=ImageTransform(image_size, train=True, scale=crop_scale),
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle=True,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        shuffle_initial=shuffle_initial,
        drop_last=drop_last,
        batches_per_epoch=batches,
        dataset_size=dataset_size,
    )
    return ClipLoader(
        stream, workers=workers, num_samples=num_samples, missing_shards=missing, pin_memory=pin_memory, epoch=epoch
    )


def make_eval_loader(
    shards: str | Sequence[str],
    *,
    tokenizer: TextTokenizer,
    image_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
    dataset_size: int | None = None,
) -> ClipLoader:
    """Evaluation loader: no shuffle, no drop, every readable sample once (split over ranks/workers by shard)."""
    _check_common(batch_size, world_size, rank, image_size, dataset_size)
    urls, missing = expand_shards(shards)
    stream = ShardStream(
        urls,
        tokenizer=tokenizer,
        transform=ImageTransform(image_size, train=False),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        shuffle=False,
        resampled=False,
        drop_last=False,
        dataset_size=dataset_size,
    )
    return ClipLoader(stream, workers=workers, num_samples=None, missing_shards=missing, pin_memory=pin_memory)
