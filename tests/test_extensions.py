"""DeepSpeed's JIT op folder: per venv, and a dead build lock is cleared instead of waited on forever."""

import os
import time
from pathlib import Path

import pytest

from neuclip_ds import extensions


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / extensions.SHM_OP).mkdir()
    return tmp_path / extensions.SHM_OP


def test_stale_lock_is_removed_and_a_live_one_kept(ext_dir):
    lock = ext_dir / "lock"
    lock.touch()
    assert extensions.clear_stale_locks() == []  # a build in progress: wait on it
    assert lock.exists()
    old = time.time() - extensions.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale torch-extension build lock"):
        assert extensions.clear_stale_locks() == [lock]
    assert not lock.exists()


def test_default_folder_is_inside_the_interpreter_prefix(monkeypatch):
    import sys

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert extensions.extensions_dir() == Path(sys.prefix) / "torch_extensions"


def shm_buffers(port: int) -> set[Path]:
    """The buffers of the run on `port` (their names carry the master port; other runs may be going on)."""
    return set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


RUN = [
    "--synthetic-samples",
    "32",
    "--global-batch-size",
    "8",
    "--npn-prototypes",
    "8",
    "--ds-config",
    "ds_configs/zero2.json",
]


@pytest.mark.parametrize("nproc", [1, 2])
def test_cpu_run_leaves_no_shm_buffers(tmp_path, nproc):
    """DeepSpeed's CPU allreduce op maps a 66 MB /dev/shm buffer per rank and never unlinks it; neuclip_ds does,
    so a finished run leaves no RAM behind (a day of test runs had left 9 GB). Under the deepspeed launcher even a
    1-rank run creates one (LOCAL_SIZE=1)."""
    from neuclip_ds.launch import free_port, launch

    port = free_port()
    proc = launch([*RUN, "--steps", "2", "--output-dir", str(tmp_path / "run")], nproc=nproc, launcher=True, port=port)
    assert "shm_comm_op built successfully" in proc.stdout + proc.stderr  # the op (and its buffers) were in use
    assert shm_buffers(port) == set()


def test_killed_run_leaves_no_shm_buffer(tmp_path):
    """SIGKILL leaves no chance to clean up: the buffer's name is gone from the moment training starts."""
    from _launch import kill_after_step

    from neuclip_ds.launch import free_port

    port = free_port()
    out = tmp_path / "run"
    kill_after_step([*RUN, "--steps", "1000", "--output-dir", str(out)], 1, out, 1, launcher=True, port=port)
    assert shm_buffers(port) == set()
