"""neuclip-train whose rank 0 is SIGKILLed in the middle of the save of step KILL_SAVE_STEP: after the engine
wrote its shards and the per-rank files, before neuclip_state.pt, COMPLETE and `latest`."""

import os
import signal

from neuclip_ds import checkpoint, train

kill_step = int(os.environ["KILL_SAVE_STEP"])
original = checkpoint.atomic_write


def atomic_write(path, *args, **kwargs):
    if path.name == checkpoint.SHARED_FILE and path.parent.name == checkpoint.tag_for(kill_step):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path, *args, **kwargs)


checkpoint.atomic_write = atomic_write  # the name checkpoint.py writes its own files through
train.cli()
