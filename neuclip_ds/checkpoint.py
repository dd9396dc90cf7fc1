"""Checkpoints through the DeepSpeed engine, with everything else a resume needs in client state.

The engine saves model, optimizer, LR scheduler and its step counters. It does not save RNG states or anything
outside it, so client_state carries: the step, the data position, the alpha estimator (NPN weights + AdaGrad state,
identical on every rank; FastCLIP u-table shards, one per rank), the skip counters, the resolved config, and the
RNG states of every rank (gathered with all_gather_object because only rank 0 writes client_state under ZeRO-1/2).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_DIR = "checkpoints"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save(engine, output_dir: str | Path, *, step: int, client_state: dict, per_rank_state: dict,
         keep_last: int) -> Path:
    """Save tag `step{N}`. `per_rank_state` (RNG, u-table shards) is gathered from every rank into client_state."""
    ckpt_dir = Path(output_dir) / CHECKPOINT_DIR
    tag = f"step{step:08d}"
    state = dict(client_state, per_rank=gather_objects(per_rank_state))
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=True)
    if dist.get_rank() == 0:
        tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir / tag


def resolve_resume(resume: str | None, output_dir: str | Path) -> tuple[Path, str] | None:
    """auto -> latest checkpoint of output_dir (None if there is none); PATH -> (checkpoints dir, tag)."""
    if resume is None:
        return None
    if resume == "auto":
        ckpt_dir = Path(output_dir) / CHECKPOINT_DIR
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            return None
        return ckpt_dir, latest.read_text().strip()
    path = Path(resume)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if path.is_dir() and path.parent.is_dir() and path.name.startswith("step"):
        return path.parent, path.name
    raise FileNotFoundError(f"--resume: {resume} is neither 'auto' nor a checkpoint directory")


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    """Load engine state and return the client state with this rank's per-rank entry under 'mine'."""
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"--resume: checkpoint {ckpt_dir / tag} does not exist")
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"--resume: DeepSpeed could not load {ckpt_dir / tag}")
    per_rank = client_state.get("per_rank", [])
    rank = dist.get_rank() if dist.is_initialized() else 0
    client_state["mine"] = per_rank[rank] if rank < len(per_rank) else None
    return client_state
