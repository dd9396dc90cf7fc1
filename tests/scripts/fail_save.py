"""neuclip-train whose rank FAIL_SAVE_RANK cannot write one file of the save of step FAIL_SAVE_STEP (an OSError, as
from a full disk): the first file whose name contains FAIL_SAVE_FILE, either one of ours (`neuclip_rank`, written
by neuclip_ds.checkpoint) or one of DeepSpeed's (`optim_states`, written inside engine.save_checkpoint); or, with
FAIL_SAVE_FILE=engine, engine.save_checkpoint itself raises before writing anything (not a file write)."""

import errno
import os

import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.engine import DeepSpeedEngine

from neuclip_ds import checkpoint, train

FAIL_TAG = checkpoint.tag_for(int(os.environ["FAIL_SAVE_STEP"]))
FAIL_RANK = int(os.environ["FAIL_SAVE_RANK"])
FAIL_FILE = os.environ["FAIL_SAVE_FILE"]


def check_disk(path) -> None:
    path = str(path)
    if dist.get_rank() == FAIL_RANK and FAIL_TAG in path and FAIL_FILE in os.path.basename(path):
        raise OSError(errno.ENOSPC, "No space left on device (injected)", path)


write_ours = checkpoint.atomic_write
write_deepspeeds = TorchCheckpointEngine.save


def atomic_write(path, *args, **kwargs):
    check_disk(path)
    return write_ours(path, *args, **kwargs)


def engine_save(self, state_dict, path):
    check_disk(path)
    return write_deepspeeds(self, state_dict, path)


save_checkpoint = DeepSpeedEngine.save_checkpoint


def engine_save_checkpoint(self, save_dir, tag=None, **kwargs):
    if FAIL_FILE == "engine" and dist.get_rank() == FAIL_RANK and tag == FAIL_TAG:
        raise RuntimeError("No space left on device (injected) in engine")
    return save_checkpoint(self, save_dir, tag=tag, **kwargs)


checkpoint.atomic_write = atomic_write  # the name checkpoint.py writes its own files through
TorchCheckpointEngine.save = engine_save
DeepSpeedEngine.save_checkpoint = engine_save_checkpoint
train.cli()
