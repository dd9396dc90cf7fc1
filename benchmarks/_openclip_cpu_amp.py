"""`open_clip_train.main` with `--precision amp_bf16` as a CPU bf16 autocast (run through `_pinned.py`).

open_clip's amp_bf16 is `torch.cuda.amp.autocast(dtype=torch.bfloat16)`, which does nothing on a CPU: there its
amp_bf16 trains in fp32. What it does on a GPU, autocast to bf16, is `torch.autocast("cpu", dtype=torch.bfloat16)`
on a CPU, so `vs_openclip.py --precision bf16` runs open_clip through this module when no GPU is used. The first use
prints a line that the benchmark checks, so a run in which the substitution did not happen is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import open_clip_train.train as open_clip_training
import torch
from open_clip_train.main import main
from vs_openclip import CPU_AMP_USED

_cuda_autocast = open_clip_training.get_autocast


def cpu_autocast(precision: str) -> Callable:  # open_clip_train.precision.get_autocast, amp_bf16 on CPU
    if precision not in ("amp_bf16", "amp_bfloat16"):
        return _cuda_autocast(precision)
    print(CPU_AMP_USED, file=sys.stderr, flush=True)
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16)


open_clip_training.get_autocast = cpu_autocast

if __name__ == "__main__":
    main(sys.argv[1:])
