"""neuclip_ds.launch without training runs: what its process handling promises when something goes wrong."""

import subprocess
import sys

import pytest

from neuclip_ds import launch as L


def test_a_rank_that_fails_to_start_leaves_no_started_rank_running(monkeypatch):
    real_popen = subprocess.Popen
    started = []

    def popen(cmd, **kwargs):
        if started:
            raise OSError("cannot start rank 1")
        child = real_popen([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs)
        started.append(child)
        return child

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(OSError, match="cannot start rank 1"):
        L.launch_ranks([], nproc=3, timeout=60)
    assert len(started) == 1
    try:
        assert started[0].poll() is not None, "rank 0 was left running"
    finally:
        if started[0].poll() is None:
            started[0].kill()
            started[0].wait()
