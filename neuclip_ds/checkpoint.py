"""Checkpoints through the DeepSpeed engine, plus what the engine does not save, written beside it.

Layout of `<output_dir>/checkpoints/`:
    stepNNNNNNNN/                 engine.save_checkpoint: model (ZeRO shards), optimizer, LR scheduler, counters
    stepNNNNNNNN/neuclip_state.pt rank 0: step, world size, config, NPN weights + AdaGrad state (identical on
                                  every rank, saved once), skip counters, the data position of synthetic streams
    stepNNNNNNNN/neuclip_rankR.pt every rank: its RNG states (torch, numpy, python, cuda), its data position,
                                  its FastCLIP u-table shards (sharded as they live: never gathered)
    stepNNNNNNNN/RUN_ID           rank 0, first: the id of the run that wrote the tag (a resumed run keeps it)
    stepNNNNNNNN/COMPLETE         rank 0, once every rank reported that its files were written and rank 0 found
                                  them all on disk; a save that failed on any rank stops the run on every rank
    latest                        moved (atomic rename) only after COMPLETE exists: a kill or a failure during a
                                  save leaves the previous checkpoint as `latest`, and resume refuses a tag
                                  without COMPLETE
Checkpoints are data, not code: every file of a checkpoint (ours and DeepSpeed's, on resume, export, eval and the
universal conversion) is read through `load_data`: `torch.load(weights_only=True)` with an allow-list of the few
DeepSpeed types those files hold. A file naming anything else is refused with one line naming it.
The last `keep_last` complete checkpoints of the current run are kept; rotation never deletes another run's tags.

Sections: save, resume (engine + our state), and loading a trained model without an engine
(`load_checkpoint_model`: the fp32 weights of any ZeRO stage + the run config -> a CLIPDualEncoder), which
evaluation and export use.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import uuid
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import distributed
from .atomic import atomic_write
from .rundir import CHECKPOINTS, RunFiles
from .stopping import one_line as _one_line

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from .data.stream import StepStream
    from .data.tokenizer import TextTokenizer
    from .engine import NeuCLIPEngine
    from .model import CLIPDualEncoder

CHECKPOINT_DIR = CHECKPOINTS
COMPLETE = "COMPLETE"
RUN_ID = "RUN_ID"
SHARED_FILE = "neuclip_state.pt"
TAG_PATTERN = re.compile(r"step\d{8,}")
TOKEN_EMBEDDING_KEY = "text.text_model.embeddings.token_embedding.weight"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from or loaded; the message names the problem (one line)."""


class CheckpointNotSaved(CheckpointError):
    """A save that failed on some rank; raised on every rank alike (the ranks agreed on it), so the run can stop
    in step. The message names the rank and file (one line)."""


# ---------------------------------------------------------------------------------------------------------------
# reading a checkpoint file: data, not code
# ---------------------------------------------------------------------------------------------------------------
def deepspeed_types() -> list[type]:
    """The DeepSpeed types a checkpoint file may hold besides what `weights_only` reads by default (tensors,
    numbers, strings, containers, torch dtypes and sizes). Found with `torch.serialization.
    get_unsafe_globals_in_checkpoint` on ZeRO-1/2/3 checkpoints (fp32, bf16) of DeepSpeed 0.19 and on their
    universal conversions: the optimizer shards hold LossScaler, ZeroStageEnum and fragment_address (ZeRO-1/2);
    fp16 saves a DynamicLossScaler where the others save a LossScaler. Each is a plain record: loading one sets its
    attributes and runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_data(f: str | os.PathLike, map_location: Any = None, *, mmap: bool | None = None, **ignored: Any) -> Any:
    """`torch.load` of one checkpoint file as data: `weights_only=True`, allowing `deepspeed_types()` besides
    torch's defaults. It stands in for `torch.load` (see `files_read_as_data`), so it takes its arguments;
    `weights_only`, `pickle_module` and other unpickling options in `ignored` are overridden.

    A file that names any other global (a function to call, a class to build) is refused before anything in it
    runs: CheckpointError, one line naming the file and the global. A file that cannot be read at all (torn,
    not a torch file) is a one-line CheckpointError too."""
    try:
        with torch.serialization.safe_globals(deepspeed_types()):
            # torch.serialization.load is the function itself; `torch.load` may be this one, standing in for it
            return torch.serialization.load(f, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))
        # torch's message is a page of advice raised `from None`; its reason is the exception it replaced
        reason = _not_allowed(named.group(1)) if named else _one_line(e.__context__ or e)[:200]
        raise CheckpointError(_refused(f, reason)) from None
    except Exception as e:
        raise CheckpointError(f"{f} cannot be read: {_one_line(e)[:200]}") from None


def _refused(path: str | os.PathLike, reason: str) -> str:
    return (
        f"{path} refused: {reason}; a checkpoint file may hold tensors, plain values and DeepSpeed's own "
        f"records only (docs/checkpoints.md: What a checkpoint may contain)"
    )


def _not_allowed(name: str) -> str:
    return f"it names {name}, which is not on the allow-list"


def check_files_are_data(*dirs: Path) -> None:
    """Collective, before a resume loads anything: every rank reads the pickle of every `*.pt` file under dirs (not
    its tensors: cheap) and, if one names a global that `load_data` would refuse, the run stops on every rank alike
    with `load_data`'s line. Without it, only the rank loading such a file would stop, and the others would wait
    for it in a DeepSpeed collective. `load_data` stays the guard: the legacy (non-zip) format is not scanned."""
    problems = distributed.gather_objects(_first_refused(sorted({p for d in dirs for p in Path(d).rglob("*.pt")})))
    problem = next((p for p in problems if p), None)
    if problem:
        raise CheckpointError(problem)


def _first_refused(paths: list[Path]) -> str | None:
    """The line of the first of paths that `load_data` would refuse (None: none). Never raises: the other ranks
    are waiting for this rank's answer."""
    for path in paths:
        try:
            if not zipfile.is_zipfile(path):
                continue
            with torch.serialization.safe_globals(deepspeed_types()):
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:
            return f"{path} cannot be read: {_one_line(e)[:200]}"
        if unsafe:
            return _refused(path, _not_allowed(unsafe[0]))
    return None


@contextlib.contextmanager
def files_read_as_data(engine: Any = None) -> Iterator[None]:
    """Every file DeepSpeed reads inside the block goes through `load_data`.

    The engine's own reads (model states and optimizer shards, on resume) go through its checkpoint engine, whose
    `load` is routed there. DeepSpeed 0.19 also calls `torch.load(weights_only=False)` directly, past any
    checkpoint engine: zero_to_fp32 (export, eval), ds_to_universal, and the universal-checkpoint loaders
    (`universal_checkpoint.load_hp_checkpoint_state`, ZeRO-3's `load_hp_checkpoint_state_from_checkpoint_dir`).
    No hook reaches those, so `torch.load` itself stands in for the block alone, and is put back after it."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_swapped(torch, "load", load_data))
        if engine is not None:
            stack.enter_context(_swapped(engine.checkpoint_engine, "load", load_data))
        yield


@contextlib.contextmanager
def _swapped(owner: Any, name: str, value: Any) -> Iterator[None]:
    """owner.name is value inside the block, and what it was after it."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


# ---------------------------------------------------------------------------------------------------------------
# RNG states as weights_only-loadable values
# ---------------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# the run's state outside DeepSpeed's engine
# ---------------------------------------------------------------------------------------------------------------
class TrainState:
    """Everything a checkpoint holds beside the engine's files (weights, optimizer, LR schedule): the step, the
    estimator (NPN + AdaGrad, E7, identical on every rank; or this rank's FastCLIP u-table shard, E9), the data
    position, the RNG states, the skip counters and the temperature's bound counter.

    `state_dict()` gives the two payloads a checkpoint stores: "shared" (rank 0 writes it once) and "rank" (each
    rank its own). `load_state_dict()` restores them, exactly at the same world size; at another one (a universal
    checkpoint) the per-rank RNG streams are reseeded, a webdataset stream restarts its epoch in another sample
    order with its bad-sample counts reset (`_load_resharded`); the rest carries over."""

    def __init__(
        self, eng: NeuCLIPEngine, stream: StepStream, *, config: dict, seed: int, rank: int, world_size: int
    ) -> None:
        self.eng, self.stream, self.config, self.seed = eng, stream, config, seed
        self.rank, self.world_size = rank, world_size

    def state_dict(self) -> dict:
        estimator = self.eng.estimator.state_dict()
        replicated = "npn" in estimator  # identical on every rank: saved once
        shared = {
            "config": self.config,
            "estimator": estimator if replicated else {},
            "skipped_steps": self.eng.skipped_steps,
            "data_rank0": self.stream.state_dict(),
            "temperature": self.eng.temperature_state(),
            "world_size": self.world_size,
        }
        rank = {"rng": rng_state(), "data": self.stream.state_dict(), "estimator": {} if replicated else estimator}
        return {"shared": shared, "rank": rank}

    def load_state_dict(self, shared: dict, tag_dir: Path) -> int:
        """Restore from a checkpoint's shared payload and the rank files in tag_dir; returns the step."""
        step = int(shared["step"])
        self.eng.skipped_steps = int(shared.get("skipped_steps", 0))
        self.eng.load_temperature_state(shared.get("temperature", {}))
        if shared["world_size"] == self.world_size:
            mine = read_rank(tag_dir, self.rank)
            self.eng.estimator.load_state_dict(shared["estimator"] or mine["estimator"])
            self.stream.load_state_dict(mine["data"])
            set_rng_state(mine["rng"])
            return step
        self._load_resharded(shared, tag_dir, step)
        return step

    def _load_resharded(self, shared: dict, tag_dir: Path, step: int) -> None:
        """Another world size: u tables re-sharded by index owner; synthetic streams continue exactly (their global
        batches do not depend on the world size); a webdataset stream restarts the saved epoch and skips the same
        fraction of it (the sample order differs); every rank is reseeded from (seed, step, rank)."""
        if shared["estimator"]:
            self.eng.estimator.load_state_dict(shared["estimator"])
        elif hasattr(self.eng.estimator, "load_resharded"):
            self.eng.estimator.load_resharded([read_rank(tag_dir, r)["estimator"] for r in range(shared["world_size"])])
        data = shared["data_rank0"]
        if "step_in_epoch" in data:  # synthetic
            self.stream.load_state_dict(data)
        else:
            loader = dict(data["loader"])
            loader["batches_in_epoch"] = loader["batches_in_epoch"] * shared["world_size"] // self.world_size
            self.stream.load_state_dict({"loader": loader, "tracker": {}})
        seed_everything(self.seed * 1000 + self.rank + 7919 * step)
        if self.rank == 0:
            print(
                f"neuclip-train: resuming a {shared['world_size']}-rank checkpoint on {self.world_size} ranks "
                f"(universal checkpoint); RNG reseeded per rank",
                file=sys.stderr,
            )


# ---------------------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------------------
def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _step_of(tag: str) -> int:
    return int(tag[len("step") :])


def _tags(ckpt_dir: Path) -> list[Path]:
    """The checkpoint tag directories in ckpt_dir (not their `_universal` conversions)."""
    return [p for p in ckpt_dir.glob("step*") if TAG_PATTERN.fullmatch(p.name) and p.is_dir()]


def run_id_of(tag_dir: Path) -> str | None:
    """The id of the run that wrote tag_dir; None for checkpoints from before run ids."""
    path = tag_dir / RUN_ID
    return path.read_text().strip() if path.is_file() else None


def run_id_for(resume_dir: Path | None) -> str:
    """Collective. The id this run writes into its checkpoints. Resuming continues the id of the checkpoint it
    loads, so that rotation goes on covering that run's earlier tags; a fresh start (or a checkpoint without a
    run id) draws a new one."""
    return _from_rank0(lambda: (run_id_of(resume_dir) if resume_dir is not None else None) or uuid.uuid4().hex)


def _from_rank0(decide):
    """Collective: rank 0 runs decide(); every rank returns its result, or raises its error (all ranks alike, so
    that they stay in step; an error other than a CheckpointError travels as a CheckpointError naming it)."""
    return distributed.from_rank0(decide, error=_as_checkpoint_error)


def _as_checkpoint_error(e: Exception) -> CheckpointError:
    return e if isinstance(e, CheckpointError) else CheckpointError(f"rank 0: {_one_line(e)}")


def save(
    engine: DeepSpeedEngine,
    output_dir: str | Path,
    *,
    step: int,
    run_id: str,
    state: dict,
    keep_last: int,
    keep: Path | None = None,
) -> Path:
    """Collective: every rank calls it with its `TrainState.state_dict()`. Returns the checkpoint directory.

    The ranks agree on the outcome: each writes its part and reports what it wrote and what failed (a failed
    write never raises before reporting: the others are waiting for its answer), rank 0 checks every reported file is on
    disk, and only then writes COMPLETE and moves `latest`. A failed save raises CheckpointNotSaved on every rank
    alike; `latest` still names the previous checkpoint. `keep`: a checkpoint rotation must not delete (the
    last one saved before the first skipped step: an abort points at it)."""
    tag_dir = Path(output_dir) / CHECKPOINT_DIR / tag_for(step)
    _from_rank0(lambda: _prepare_tag_dir(tag_dir, run_id))
    report = _write_this_rank(
        engine,
        tag_dir,
        shared_state=dict(state["shared"], step=step, world_size=distributed.world_size()),
        rank_state=state["rank"],
    )
    reports = distributed.gather_objects(report)
    _from_rank0(lambda: _commit(tag_dir, reports, run_id=run_id, keep_last=keep_last, keep=keep))
    return tag_dir


def _prepare_tag_dir(tag_dir: Path, run_id: str) -> None:
    """Rank 0, before any rank writes: an empty tag directory that names its run.

    A tag directory already there is replaced when it is this run's (a save that was interrupted, or a resume
    from an earlier tag that goes over it again) or a half-written one of any run (no checkpoint: resume refuses
    it); filling it in place would mix two saves' files. A complete checkpoint of another run is never touched."""
    if tag_dir.exists() and run_id_of(tag_dir) != run_id and (tag_dir / COMPLETE).is_file():
        raise CheckpointNotSaved(
            f"checkpoint {tag_dir.name} not saved: {tag_dir} is a complete checkpoint of "
            f"another run; not writing over it"
        )
    try:
        _step_latest_back_from(tag_dir)
        _remove_tag(tag_dir)
        tag_dir.mkdir(parents=True)
        (tag_dir / RUN_ID).write_text(run_id + "\n")
    except OSError as e:
        raise CheckpointNotSaved(f"checkpoint {tag_dir.name} not saved: {_one_line(e)}") from None


def _step_latest_back_from(tag_dir: Path) -> None:
    """`latest` never names a tag that is being rewritten: if it does, it moves to the newest complete checkpoint
    before that tag (with none, it goes)."""
    latest = tag_dir.parent / "latest"
    if not latest.is_file() or latest.read_text().strip() != tag_dir.name:
        return
    step = _step_of(tag_dir.name)
    earlier = [p.name for p in _tags(tag_dir.parent) if _step_of(p.name) < step and (p / COMPLETE).is_file()]
    if earlier:
        atomic_write(latest, max(earlier, key=_step_of))
    else:
        latest.unlink()


def _write_this_rank(engine, tag_dir: Path, *, shared_state: dict, rank_state: dict) -> dict:
    """This rank's part of a save: the engine's files, its own file (rank 0: also the shared one). Never raises:
    {"rank", "written": paths relative to tag_dir, "failed": "what: why" lines}."""
    rank = distributed.rank()
    report = {"rank": rank, "written": [], "failed": []}
    try:
        with _engine_writes_reported(engine, tag_dir, report):
            engine.save_checkpoint(str(tag_dir.parent), tag=tag_dir.name, save_latest=False)
    except Exception as e:
        # not a file write (those are reported): the other ranks may be inside one of save_checkpoint's barriers,
        # so no agreement can follow. This rank fails, and the failure path ends the others (stopping.py).
        raise CheckpointNotSaved(
            f"checkpoint {tag_dir.name} not saved (rank {rank}: engine.save_checkpoint: "
            f"{_one_line(e)}); `latest` still names {_latest_name(tag_dir.parent)}"
        ) from None
    ours = [(f"neuclip_rank{rank}.pt", rank_state)] + ([(SHARED_FILE, shared_state)] if rank == 0 else [])
    for name, payload in ours:
        try:
            atomic_write(tag_dir / name, functools.partial(torch.save, payload))
            report["written"].append(name)
        except Exception as e:
            report["failed"].append(f"{name}: {_one_line(e)}")
    return report


@contextlib.contextmanager
def _engine_writes_reported(engine, tag_dir: Path, report: dict):
    """Route the engine's file writes into `report` instead of letting a failed one raise: DeepSpeed's
    save_checkpoint has barriers between and after its writes, and a rank leaving it early would leave the other
    ranks waiting in one of them. Every file DeepSpeed saves goes through `engine.checkpoint_engine.save`."""
    original = engine.checkpoint_engine.save

    def save(state_dict, path, *args, **kwargs):
        name = os.path.relpath(path, tag_dir)
        try:
            original(state_dict, path, *args, **kwargs)
            report["written"].append(name)
        except Exception as e:
            report["failed"].append(f"{name}: {_one_line(e)}")

    with _swapped(engine.checkpoint_engine, "save", save):
        yield


def _commit(tag_dir: Path, reports: list[dict], *, run_id: str, keep_last: int, keep: Path | None) -> None:
    """Rank 0, after every rank reported: if every rank wrote its part and every file is on disk, COMPLETE, then
    `latest`, then rotation; else CheckpointNotSaved (`latest` unchanged)."""
    ckpt_dir = tag_dir.parent
    problems = [f"rank {r['rank']}: {line}" for r in reports for line in r["failed"]]
    if not problems:
        expected = [
            RUN_ID,
            SHARED_FILE,
            *(f"neuclip_rank{r['rank']}.pt" for r in reports),
            *(name for r in reports for name in r["written"]),
        ]
        problems = [f"{name} is not on disk" for name in dict.fromkeys(expected) if not (tag_dir / name).is_file()]
    if not problems:
        try:
            (tag_dir / COMPLETE).write_text(f"{_step_of(tag_dir.name)}\n")
            atomic_write(ckpt_dir / "latest", tag_dir.name)
        except OSError as e:
            problems.append(_one_line(e))
    if problems:
        raise CheckpointNotSaved(
            f"checkpoint {tag_dir.name} not saved ({'; '.join(problems)}); `latest` still "
            f"names {_latest_name(ckpt_dir)}"
        )
    try:
        rotate(ckpt_dir, run_id=run_id, current=tag_dir.name, keep_last=keep_last, keep=keep)
    except OSError as e:  # the checkpoint is saved; older ones left behind only cost disk space
        warnings.warn(f"checkpoint rotation in {ckpt_dir}: {_one_line(e)}", stacklevel=2)


def _latest_name(ckpt_dir: Path) -> str:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else "no checkpoint"


def rotate(ckpt_dir: Path, *, run_id: str, current: str, keep_last: int, keep: Path | None = None) -> list[str]:
    """Rank 0, once `current` is complete and `latest`: delete this run's complete checkpoints beyond the newest
    keep_last (except `keep`) and its half-written saves older than `current`. Returns the deleted tags.

    Only tags carrying run_id (up to `current`'s step) are candidates: another run's checkpoints are never
    deleted, whatever their names, and `current` is the newest candidate, so it is always kept."""
    step = _step_of(current)
    mine = sorted(
        (p for p in _tags(ckpt_dir) if _step_of(p.name) <= step and run_id_of(p) == run_id),
        key=lambda p: _step_of(p.name),
    )
    complete = [p for p in mine if (p / COMPLETE).is_file()]
    half_written = [p for p in mine if p not in complete]
    doomed = [p for p in complete[:-keep_last] if keep is None or p.resolve() != keep.resolve()] + half_written
    for tag_dir in doomed:
        _remove_tag(tag_dir)
    return [p.name for p in doomed]


def _remove_tag(tag_dir: Path) -> None:
    """A tag and its universal conversion (made from it on a world-size change)."""
    shutil.rmtree(tag_dir.with_name(tag_dir.name + "_universal"), ignore_errors=True)
    shutil.rmtree(tag_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------------------
def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """auto -> the latest complete checkpoint of output_dir (None: start fresh); PATH -> that checkpoint.

    PATH may be a tag directory (`.../checkpoints/step00000100`), a checkpoints directory or a run directory."""
    if resume is None:
        return None
    if resume == "auto":
        latest = Path(output_dir) / CHECKPOINT_DIR / "latest"
        if not latest.is_file():
            return None
        tag_dir = latest.parent / read_latest(latest, "--resume")
    else:
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"--resume: {resume} does not exist")
        for candidate in (path / CHECKPOINT_DIR / "latest", path / "latest"):
            if candidate.is_file():
                path = candidate.parent / read_latest(candidate, "--resume")
                break
        tag_dir = path
    if not (tag_dir / COMPLETE).is_file() or not (tag_dir / SHARED_FILE).is_file():
        raise CheckpointError(
            f"--resume: {tag_dir} is not a complete checkpoint (no {COMPLETE} marker: the save "
            f"was interrupted); resume from an earlier tag"
        )
    return tag_dir


def read_latest(latest: Path, option: str) -> str:
    """The tag a `latest` file names. Only a tag of ours (TAG_PATTERN) is joined to its directory: whatever else
    the file holds (`../../etc`, an absolute path) would lead outside the checkpoints, so it is refused."""
    name = latest.read_text().strip()
    if not TAG_PATTERN.fullmatch(name):
        raise CheckpointError(f"{option}: {latest} names {name[:100]!r}, not a checkpoint tag (stepNNNNNNNN)")
    return name


# what neuclip_state.pt must hold, and of which type, for a resume to use it (other keys are optional)
SHARED_SCHEMA = {"step": int, "world_size": int, "config": dict, "estimator": dict, "data_rank0": dict}


def read_shared(tag_dir: Path) -> dict:
    """The checkpoint's neuclip_state.pt, checked against SHARED_SCHEMA: a file of another program or version is
    a one-line CheckpointError here, not a KeyError deep in the resume."""
    path = tag_dir / SHARED_FILE
    shared = load_data(path)
    if not isinstance(shared, dict):
        raise CheckpointError(f"--resume: {path} holds a {type(shared).__name__}, not neuclip_ds's state")
    missing = [key for key in SHARED_SCHEMA if key not in shared]
    if missing:
        raise CheckpointError(f"--resume: {path} is not neuclip_ds's state (no {', '.join(missing)})")
    for key, kind in SHARED_SCHEMA.items():
        value = shared[key]
        wrong = not isinstance(value, kind) or isinstance(value, bool)
        if not wrong and kind is int:
            wrong = value < (1 if key == "world_size" else 0)
        if wrong:
            raise CheckpointError(f"--resume: {path}: {key} is {value!r:.60}, not a valid {kind.__name__}")
    return shared


def read_rank(tag_dir: Path, rank: int) -> dict:
    path = tag_dir / f"neuclip_rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"--resume: {path} is missing")
    return load_data(path)


# the options that define what a checkpoint holds; resuming with another value is an error, not a surprise
MUST_MATCH = ("preset", "pretrained_hf", "loss", "npn_prototypes", "npn_variant", "dataset_size", "tau_param")


def check_compatible(saved_config: dict, config: dict, zero_stage: int | None = None) -> None:
    if zero_stage is not None and saved_config.get("zero_stage", zero_stage) != zero_stage:
        raise CheckpointError(
            f"--resume: the checkpoint is ZeRO stage {saved_config.get('zero_stage')}, this run "
            f"uses stage {zero_stage}; DeepSpeed cannot change the stage on resume (export the "
            f"weights with neuclip-export and start a fresh run from them)"
        )
    saved_config = {"tau_param": "raw", **saved_config}  # a config without tau_param stores tau raw
    for key in MUST_MATCH:
        if saved_config.get(key) != config.get(key):
            raise CheckpointError(
                f"--resume: the checkpoint was written with --{key.replace('_', '-')} "
                f"{saved_config.get(key)!r}, this run has {config.get(key)!r}"
            )


def to_universal(tag_dir: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (rank 0 runs ds_to_universal reading every file
    as data, `neuclip_ds.ds_to_universal`; the others get its outcome, so a failure names its cause on every rank).

    Used when the world size changed; the engine then loads it with `checkpoint.load_universal`."""
    out = tag_dir.parent / (tag_dir.name + "_universal")

    def convert() -> None:
        if (out / COMPLETE).is_file():
            return
        shutil.rmtree(out, ignore_errors=True)
        folders = ["--input_folder", str(tag_dir), "--output_folder", str(out)]
        options = "--num_extract_workers 1 --num_merge_workers 1 --inject_missing_state".split()
        cmd = [sys.executable, "-m", "neuclip_ds.ds_to_universal", *folders, *options]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(
                f"--resume: ds_to_universal failed on {tag_dir}: "
                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
            )
        (out / COMPLETE).write_text("universal\n")

    _from_rank0(convert)
    return out


def _load_universal_groups_without_local_elements(optimizer, lp_groups_name: str, checkpoint_dir: str) -> None:
    """DeepSpeed's ZeRO-1/2 universal-checkpoint loader (`load_hp_checkpoint_state_from_checkpoint_dir`, 0.19.x)
    with one change: a parameter group of which this rank holds no element gets no step count from its fragments
    instead of an IndexError. The temperature is a one-element group (its own lr, E6), so at 2+ ranks every rank
    but one holds only padding of it; without this, resuming at another world size fails on those ranks."""
    from deepspeed.runtime.base_optimizer import _get_universal_checkpoint_ep_info
    from deepspeed.runtime.utils import bwc_tensor_model_parallel_rank
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    checkpoint_dir = os.path.join(checkpoint_dir, "zero")
    optim_sd = load_data(os.path.join(checkpoint_dir, "optimizer_state.pt"))
    optimizer._load_global_state(optim_sd)
    tp_rank = bwc_tensor_model_parallel_rank(mpu=optimizer.mpu)
    ep_rank, ep_size = _get_universal_checkpoint_ep_info()
    for i, (group, loaded) in enumerate(zip(optimizer.optimizer.param_groups, optim_sd["param_groups"])):
        keys, steps = set(), []
        for lp in getattr(optimizer, lp_groups_name)[i]:
            if lp._hp_mapping is not None:
                steps.append(
                    lp.load_hp_checkpoint_state(
                        os.path.join(checkpoint_dir, optimizer.param_names[lp]),
                        tp_rank,
                        1,
                        ep_rank=ep_rank,
                        ep_size=ep_size,
                    )
                )
                keys.update(lp._hp_mapping.get_optim_state_keys())
        if any(step != steps[0] for step in steps):
            raise CheckpointError(f"--resume: universal checkpoint steps differ within a group: {steps}")
        if steps and steps[0] is not None:
            optimizer.optimizer.state[group["params"][0]]["step"] = steps[0]
        map_to_flat_opt_states(
            group["params"][0], getattr(optimizer, lp_groups_name)[i], optimizer.optimizer.state, keys
        )
        group.update({k: v for k, v in loaded.items() if k != "params"})


def load_engine(engine: DeepSpeedEngine, tag_dir: Path) -> None:
    opt = engine.optimizer
    if (
        engine.load_universal_checkpoint()
        and hasattr(opt, "load_hp_checkpoint_state_from_checkpoint_dir")
        and getattr(opt, "mpu", None) is None
        and engine.zero_optimization_stage() in (1, 2)
    ):
        opt.load_hp_checkpoint_state_from_checkpoint_dir = lambda name, folder: (
            _load_universal_groups_without_local_elements(opt, name, folder)
        )
    with files_read_as_data(engine):
        load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=True)
    if load_path is None:
        raise CheckpointError(f"--resume: DeepSpeed could not load {tag_dir}")


# ------------------------------------------------------------------------------------------------------------
# Loading a trained model from a checkpoint (evaluation, export): no engine, no process group
# ------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None) -> tuple[Path, str, Path]:
    """(checkpoints dir, tag, run output dir) of a run dir, its ``checkpoints/`` dir or a tag dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--checkpoint: {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"--checkpoint: {p} is not a directory")
    if (p / "checkpoints").is_dir() and not (p / "latest").is_file():
        p = p / "checkpoints"
    if (p / "latest").is_file() or (tag is not None and (p / tag).is_dir()):
        ckpt_dir = p
        tag = tag or read_latest(p / "latest", "--checkpoint")
    elif any(p.glob("*model_states.pt")):
        ckpt_dir, tag = p.parent, tag or p.name
    else:
        raise CheckpointError(
            f"--checkpoint: {path} is not a DeepSpeed checkpoint (no 'latest' file, no "
            f"checkpoints/ dir, no *model_states.pt)"
        )
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"--checkpoint: tag {tag!r} not found in {ckpt_dir}")
    return ckpt_dir, tag, ckpt_dir.parent


def load_checkpoint_state_dict(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """fp32 {name: tensor} of the model of one DeepSpeed checkpoint tag (ZeRO-1/2/3 or no ZeRO)."""
    tag_dir = Path(ckpt_dir) / tag
    if any(tag_dir.glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr), files_read_as_data():  # it prints progress; stdout: the table
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"--checkpoint: no model states in {tag_dir}")
    blob = load_data(files[0], map_location="cpu")
    state = blob.get("module") if isinstance(blob, dict) else None
    if not state:
        raise CheckpointError(f"--checkpoint: {files[0]} holds no module weights (ZeRO-3 without optimizer shards?)")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_run_config(
    run_dir: str | os.PathLike, ckpt_dir: str | os.PathLike | None = None, tag: str | None = None
) -> dict:
    """The run's ``config.yaml``; else the ``config`` saved in the checkpoint's client state."""
    import yaml

    path = RunFiles(Path(run_dir)).config
    if path.is_file():
        cfg = yaml.safe_load(path.read_text()) or {}
        if not isinstance(cfg, dict):
            raise CheckpointError(f"--checkpoint: {path} does not hold a mapping")
        return cfg
    if ckpt_dir is not None and tag is not None:
        shared = Path(ckpt_dir) / tag / SHARED_FILE  # written by save() above (plain values)
        if shared.is_file():
            blob = load_data(shared, map_location="cpu")
            if isinstance(blob, dict) and isinstance(blob.get("config"), dict):
                return blob["config"]
    raise CheckpointError(f"--checkpoint: no config.yaml in {run_dir} (needed to rebuild the model)")


def model_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping, tokenizer: TextTokenizer | None = None
) -> CLIPDualEncoder:
    """Rebuild the trainer's ``CLIPDualEncoder`` from a run config and load ``state_dict`` (strict).

    ``config`` keys used: ``preset``, ``pretrained_hf`` (architecture from that HF dir), ``loss`` (SigLIP adds
    ``logit_bias``), ``init_tau``/``tau_min``/``tau_max``. How tau is stored is read off the weights themselves
    (``logit_scale``: log 1/tau; ``tau``: tau itself, as ``--tau-param raw`` and configs without ``tau_param`` store
    it). The vocabulary size and special-token ids come from ``tokenizer`` (a ``TextTokenizer``) when its size
    matches the checkpoint's token embedding; otherwise (runs trained without a tokenizer, e.g. on synthetic data)
    from the checkpoint's embedding rows with the preset's default ids, with a warning (an error when the run named
    a tokenizer).
    """
    from .model import build_model, load_hf_clip

    with_bias = config.get("loss") == "siglip"
    tau_min = float(config.get("tau_min", 0.01))
    tau_max = float(config.get("tau_max", 1.0))
    init_tau = float(config.get("init_tau", 0.07))
    tau_param = "log" if "logit_scale" in state_dict else "raw"
    if config.get("pretrained_hf"):
        hf = Path(config["pretrained_hf"])
        if not (hf / "config.json").is_file():
            raise CheckpointError(
                f"--checkpoint: the run was fine-tuned from {hf}, which is needed to rebuild the "
                f"architecture but is not a CLIPModel directory any more"
            )
        model = load_hf_clip(hf, tau_min=tau_min, tau_max=tau_max, tau_param=tau_param, with_bias=with_bias)
    else:
        preset = config.get("preset")
        if not preset:
            raise CheckpointError("--checkpoint: the run config names no preset")
        rows = state_dict[TOKEN_EMBEDDING_KEY].shape[0] if TOKEN_EMBEDDING_KEY in state_dict else None
        ids = {}
        vocab_size = rows
        if tokenizer is not None and (rows is None or tokenizer.vocab_size == rows):
            vocab_size = tokenizer.vocab_size
            ids = dict(
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        elif tokenizer is not None:
            msg = f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's text embedding has {rows} rows"
            if config.get("tokenizer"):
                raise CheckpointError(f"--tokenizer: {msg}; use the run's tokenizer ({config['tokenizer']})")
            warnings.warn(
                f"eval: {msg} (the run was trained without a tokenizer); using the preset's default "
                f"special-token ids: text metrics are meaningless unless the vocabularies agree",
                stacklevel=2,
            )
        try:
            model = build_model(
                preset,
                vocab_size=vocab_size,
                init_tau=min(max(init_tau, tau_min), tau_max),
                tau_min=tau_min,
                tau_max=tau_max,
                tau_param=tau_param,
                with_bias=with_bias,
                **ids,
            )
        except ValueError as e:
            raise CheckpointError(f"--checkpoint: {e}") from None
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"--checkpoint: the weights do not match the model of the run config: "
            f"{' '.join(s.strip() for s in first[:3])[:400]}"
        ) from None
    return model.eval()


def load_checkpoint_model(
    checkpoint: str | os.PathLike, *, tokenizer: TextTokenizer | None = None, tag: str | None = None
) -> tuple[CLIPDualEncoder, dict, Path]:
    """(model, run config, run dir) of a trainer checkpoint (see ``resolve_checkpoint``)."""
    ckpt_dir, tag, run_dir = resolve_checkpoint(checkpoint, tag)
    config = read_run_config(run_dir, ckpt_dir, tag)
    state = load_checkpoint_state_dict(ckpt_dir, tag)
    return model_from_state_dict(state, config, tokenizer), config, run_dir
