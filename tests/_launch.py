"""What only the tests need on top of neuclip_ds.launch: runs stopped by a signal at a given step, rank scripts with
injected faults (tests/scripts), small DeepSpeed configs."""

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from neuclip_ds.launch import command, cpu_env, last_step, launch, read_back

ROOT = Path(__file__).resolve().parents[1]


def launch_script(
    script: str, args: list[str], *, nproc: int = 1, timeout: int = 300, check: bool = True, extra_env=None
) -> subprocess.CompletedProcess:
    """Run a rank entry point (a tests/scripts file that patches neuclip-train) on `nproc` ranks."""
    return launch(args, nproc=nproc, script=script, timeout=timeout, check=check, extra_env=extra_env)


def kill_after_step(
    args: list[str], nproc: int, out: Path, kill_step: int, timeout: int = 300, *, extra_env=None, **command_kw
) -> None:
    """Start a run, SIGKILL its whole process group once metrics.jsonl shows `kill_step`."""
    proc = subprocess.Popen(
        command(args, nproc=nproc, **command_kw),
        cwd=ROOT,
        env=cpu_env(extra_env=extra_env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if _reached(out, kill_step):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            if proc.poll() is not None:
                raise AssertionError(f"run ended (rc {proc.returncode}) before step {kill_step}")
            time.sleep(0.05)
        raise AssertionError("timeout waiting for the run to reach the kill step")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def signal_after_step(
    cmd: list[str], out: Path, sig: int, step: int, *, extra_env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `cmd` (a launcher script), send `sig` to it alone once metrics.jsonl shows `step`, and wait for it to
    end. Whatever it started is killed at the end, so a launcher that failed to stop its ranks cannot leave them
    running (they may sit in sessions of their own: found as descendants, not by process group)."""
    import psutil

    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(extra_env=extra_env), stdout=stdout, stderr=stderr)
        descendants: set = set()
        try:
            deadline = time.monotonic() + timeout
            while child.poll() is None and not _reached(out, step):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{' '.join(cmd)}: step {step} not reached in {timeout} s")
                descendants.update(psutil.Process(child.pid).children(recursive=True))
                time.sleep(0.05)
            if child.poll() is not None:
                raise AssertionError(
                    f"{' '.join(cmd)} ended (rc {child.returncode}) before step {step}:\n{read_back(stderr)[-3000:]}"
                )
            descendants.update(psutil.Process(child.pid).children(recursive=True))
            child.send_signal(sig)
            child.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{' '.join(cmd)} still running {timeout} s after the signal") from None
        finally:
            leftovers = [*descendants, *([psutil.Process(child.pid)] if child.poll() is None else [])]
            for process in leftovers:  # psutil checks it is still the same process before signalling
                with contextlib.suppress(psutil.Error):
                    process.kill()
        return subprocess.CompletedProcess(cmd, child.returncode, read_back(stdout), read_back(stderr))


def _reached(out: Path, step: int) -> bool:
    return last_step(out) >= step


def write_ds_config(path: Path, *, stage: int, accumulation: int = 1) -> str:
    path.write_text(
        json.dumps(
            {
                "gradient_accumulation_steps": accumulation,
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": stage},
            }
        )
    )
    return str(path)
