"""DeepSpeed's JIT op folder: per venv, and a dead build lock is cleared instead of waited on forever."""

import os
import time

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
    assert extensions.extensions_dir() == extensions.Path(sys.prefix) / "torch_extensions"
