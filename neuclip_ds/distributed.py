"""Who am I, how many are we, and agreeing on something: the process-group queries and the small collectives that
keep the ranks deciding alike, in one place.

Every function also works without a process group (one process is rank 0 of 1, and a collective over it is the
identity), so the same code runs under a launcher, in a plain `python` call and in tests. Collectives run only when
there are other ranks (`is_distributed`).

torch and the standard library only, so that any module can import it. Starting the process group stays in
`engine.init_distributed`, which goes through DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

__all__ = [
    "any_rank",
    "from_rank0",
    "gather_objects",
    "is_distributed",
    "is_initialized",
    "max_over_ranks",
    "rank",
    "sum_over_ranks",
    "world_size",
]


def is_initialized() -> bool:
    """Whether this process belongs to a started process group (of any size, one rank included)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the process group; 0 without one."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of ranks in the process group; 1 without one."""
    return dist.get_world_size() if is_initialized() else 1


def is_distributed() -> bool:
    """Whether there are other ranks to talk to: a started process group of more than one rank."""
    return world_size() > 1


def max_over_ranks(value: int, device: torch.device | str | None = None) -> int:
    """Collective: the largest `value` passed by any rank, the same on every rank (one all-reduce). `device`: where
    the all-reduce runs (under NCCL, this rank's CUDA device)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def sum_over_ranks(values: list[float], device: torch.device | str | None = None) -> list[float]:
    """Collective: the element-wise sum of every rank's `values` (same length on every rank), in float64, the same
    on every rank (one all-reduce). `device`: as in `max_over_ranks` (NCCL has no CPU tensors)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device | str | None = None) -> bool:
    """Collective: whether `flag` holds on some rank, the same answer on every rank (one all-reduce)."""
    return max_over_ranks(int(flag), device) > 0


def gather_objects(obj: T) -> list[T]:
    """Collective: every rank's `obj` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def from_rank0(decide: Callable[[], T], *, error: Callable[[Exception], BaseException] = lambda e: e) -> T:
    """Collective: rank 0 runs `decide()`; every rank returns its result, or raises the same error, so that the ranks
    stay in step whatever rank 0 met. `error` maps the exception raised on rank 0 to the one every rank raises; it
    travels pickled, so it should be a plain exception with its message in its arguments."""
    box: list = [None]
    if rank() == 0:
        try:
            box = [(decide(), None)]
        except Exception as e:
            box = [(None, error(e))]
    if is_distributed():
        dist.broadcast_object_list(box, src=0)
    result, raised = box[0]
    if raised is not None:
        raise raised
    return result
