"""Where DeepSpeed's JIT-compiled ops live, and building them ahead of time.

On CPU, `deepspeed.init_distributed` compiles its shared-memory allreduce op (`deepspeed_shm_comm`, ~30-60 s on
2 cores) through torch's cpp_extension, which by default builds into ~/.cache/torch_extensions — one folder
shared by every virtual environment on the machine. Two venvs (a checkout and a clean clone) have different
source paths, so each one rebuilds the op there in turn, and a process killed during a build leaves a `lock` file
that makes every later DeepSpeed process wait on it forever, with no error and no timeout of its own. So:

- each interpreter prefix gets its own extensions folder (`<sys.prefix>/torch_extensions`, unless the user set
  TORCH_EXTENSIONS_DIR), so venvs never share or rebuild each other's ops;
- `make install` builds the op once (`python -m neuclip_ds.extensions`), outside any test timeout;
- a lock older than any real build (STALE_LOCK_S) is a leftover of a killed process: it is removed with a warning
  instead of being waited on.

The op's shared-memory buffers (`/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`, 66 MB per rank, in
RAM) are never unlinked by DeepSpeed 0.19: every CPU run under a launcher leaves them behind, and /dev/shm fills up
over many runs. DeepSpeed creates them whenever LOCAL_SIZE (set by its launcher) equals the world size, so a 1-rank
launcher run has one too, although it never all-reduces through it. `release_shm_buffers` unlinks this rank's buffer
name once every rank has mapped every buffer; the mappings stay valid and the kernel frees the memory when the last
rank exits, even after a SIGKILL.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

SHM_OP = "deepspeed_shm_comm"
STALE_LOCK_S = 600.0  # a build takes ~1 min on 2 cores; a no-op load holds the lock for about a second


def default_extensions_dir() -> Path:
    """This interpreter prefix's own extensions folder (what TORCH_EXTENSIONS_DIR defaults to here)."""
    return Path(sys.prefix) / "torch_extensions"


def extensions_dir() -> Path:
    """The folder torch builds JIT extensions into for this interpreter (sets TORCH_EXTENSIONS_DIR if unset)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_extensions_dir()))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def clear_stale_locks(max_age_s: float = STALE_LOCK_S) -> list[Path]:
    """Remove build locks older than `max_age_s` under the extensions folder; returns what was removed."""
    removed = []
    root = extensions_dir()
    for lock in root.glob("*/lock") if root.is_dir() else ():
        try:
            age = time.time() - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                removed.append(lock)
                warnings.warn(
                    f"removed a stale torch-extension build lock {lock} ({age / 60:.0f} min old, left by "
                    f"a killed build); the op is rebuilt if it is incomplete",
                    stacklevel=2,
                )
        except FileNotFoundError:  # another process released it meanwhile
            pass
    return removed


def prepare_cpu_ops() -> None:
    """Called before `deepspeed.init_distributed`: per-venv extensions folder, no waiting on a dead lock."""
    extensions_dir()
    clear_stale_locks()


def shm_buffer_path(rank: int) -> Path:
    """The name DeepSpeed's shm op gives this rank's buffer (shm.cpp: SHM_BUFFER_NAME_uid_addr_port_rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffers() -> None:
    """After `deepspeed.init_distributed` on CPU: a barrier (so every rank has opened every other rank's buffer,
    which DeepSpeed does inside init; a single rank has nobody to wait for), then unlink this rank's buffer name
    (if DeepSpeed made one)."""
    import torch.distributed as dist

    from . import distributed

    if not distributed.is_initialized():
        return
    if distributed.is_distributed():
        dist.barrier()
    shm_buffer_path(distributed.rank()).unlink(missing_ok=True)


def build_cpu_ops() -> str:
    """Build (or find built) the CPU shm comm op DeepSpeed loads at init; returns a one-line report."""
    prepare_cpu_ops()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return f"DS accelerator is {get_accelerator().device_name()}: no CPU op to build"
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return "DeepSpeed's shm comm op is not available here: CPU ranks use plain gloo collectives"
    start = time.time()
    builder.load(verbose=False)
    return f"DeepSpeed {builder.NAME} op ready in {extensions_dir()} ({time.time() - start:.0f} s)"


def main() -> int:
    import torch

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        print("CUDA present: DeepSpeed uses NCCL, no CPU op to build")
        return 0
    print(build_cpu_ops())
    return 0


if __name__ == "__main__":
    sys.exit(main())
