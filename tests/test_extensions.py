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
    assert extensions.clear_stale_locks() == []          # a build in progress: wait on it
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


def test_two_rank_cpu_run_leaves_no_shm_buffers(tmp_path):
    """DeepSpeed's CPU allreduce op maps a 66 MB /dev/shm buffer per rank and never unlinks it; neuclip_ds does,
    so a finished run leaves no RAM behind (a day of test runs had left 9 GB)."""
    from _launch import launch

    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    proc = launch(["--synthetic-samples", "32", "--steps", "2", "--global-batch-size", "8", "--npn-prototypes", "8",
                   "--ds-config", "ds_configs/zero2.json", "--output-dir", str(tmp_path / "run")], nproc=2)
    assert "shm_comm_op built successfully" in proc.stdout + proc.stderr   # the op (and its buffers) were in use
    assert set(shm.glob("deepspeed_allreduce_buffer_*")) - before == set()
