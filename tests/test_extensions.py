"""DeepSpeed's JIT op folder: per venv, and a dead build lock is cleared instead of waited on forever."""

import concurrent.futures
import os
import re
import time
import types
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


RUN = "--synthetic-samples 32 --global-batch-size 8 --npn-prototypes 8 --ds-config ds_configs/zero2.json".split()


SHARED_STEPS = 40  # ample margin for /dev/shm to be looked at between the first and the last step


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """The one 1-rank run under the deepspeed launcher that both 1-rank tests below use: /dev/shm is looked at
    while it trains (after its first step, before its last) and after it finished."""
    from neuclip_ds.launch import free_port, last_step, launch

    port = free_port()
    out = tmp_path_factory.mktemp("shm") / "run"
    args = [*RUN, "--steps", str(SHARED_STEPS), "--output-dir", str(out)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        run = pool.submit(launch, args, nproc=1, launcher=True, port=port)
        while last_step(out) < 1 and not run.done():
            time.sleep(0.01)
        assert not run.done(), f"the run ended before /dev/shm was looked at: {run.result().stderr[-2000:]}"
        while_training = shm_buffers(port)
        assert last_step(out) < SHARED_STEPS, "looked at /dev/shm after the last step: raise SHARED_STEPS"
        proc = run.result()
    return types.SimpleNamespace(port=port, proc=proc, while_training=while_training)


@pytest.mark.parametrize("nproc", [1, 2])
def test_cpu_run_leaves_no_shm_buffers(tmp_path, nproc, request):
    """DeepSpeed's CPU allreduce op maps a 66 MB /dev/shm buffer per rank and never unlinks it; neuclip_ds does,
    so a finished run leaves no RAM behind (a day of test runs had left 9 GB). Under the deepspeed launcher even a
    1-rank run creates one (LOCAL_SIZE=1). 1 rank: the run shared with test_no_shm_buffer_name_exists_while_training."""
    from neuclip_ds.launch import free_port, launch

    if nproc == 1:
        run = request.getfixturevalue("one_rank_run")
        port, proc = run.port, run.proc
    else:
        port = free_port()
        out = tmp_path / "run"
        proc = launch([*RUN, "--steps", "2", "--output-dir", str(out)], nproc=nproc, launcher=True, port=port)
    assert "shm_comm_op built successfully" in proc.stdout + proc.stderr  # the op (and its buffers) were in use
    assert shm_buffers(port) == set()


def test_no_shm_buffer_name_exists_while_training(one_rank_run):
    """What a SIGKILL would leave: a kill unlinks nothing, so what /dev/shm holds while the run trains (after step
    1) is what a kill then leaves. The 1-rank run that test_cpu_run_leaves_no_shm_buffers checks is looked at then,
    instead of killing a run of its own; test_shm_buffers_glob_matches_deepspeeds_buffer_name shows that the glob
    would have found the buffer."""
    assert one_rank_run.while_training == set()


def test_shm_buffers_glob_matches_deepspeeds_buffer_name(monkeypatch):
    """The positive control of the /dev/shm checks: the name DeepSpeed's shm op creates, built from the formats in
    its own source (shm.cpp), is the name `release_shm_buffers` unlinks and one that `shm_buffers` finds; so an
    empty result above means no buffer, not a pattern that matches nothing."""
    import deepspeed

    source = (Path(deepspeed.__file__).parent / "ops" / "csrc" / "cpu" / "comm" / "shm.cpp").read_text()
    base = re.search(r'#define SHM_BUFFER_NAME "(\w+)"', source).group(1)
    prefix_format = re.search(r'snprintf\(shm_name_prefix,\s*NAME_BUF_SIZE,\s*"([^"]+)"', source).group(1)
    name_format = re.search(r'snprintf\(shm_name,\s*NAME_BUF_SIZE,\s*"([^"]+)",\s*shm_name_prefix', source).group(1)
    port = 40000 + os.getpid() % 20000
    name = name_format % (prefix_format % (base, os.getuid(), "127.0.0.1", str(port)), 0)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    assert extensions.shm_buffer_path(0) == Path("/dev/shm") / name
    buffer = Path("/dev/shm") / name  # what a run whose release is disabled leaves
    buffer.touch()
    try:
        assert shm_buffers(port) == {buffer}
    finally:
        buffer.unlink()
