"""Launch neuclip-train runs in subprocesses (1 rank: python -m; N ranks: the deepspeed launcher, or one process
per rank; CPU/gloo)."""

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(
        os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"
    )
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def command(
    args: list[str],
    *,
    nproc: int = 1,
    module: str = "neuclip_ds.train",
    script: str | None = None,
    launcher: bool = False,
    port: int | None = None,
) -> list[str]:
    """1 rank: the interpreter, unless `launcher`; N ranks: the deepspeed launcher (CPU ranks over gloo), on
    `port` (default: a free one). A script, else a module."""
    target = [script] if script else ["-m", module]
    if nproc == 1 and not launcher:
        return [sys.executable, *target, *args]
    ds_target = [script] if script else ["--module", module]
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--no_local_rank",
        "--master_port",
        str(port or free_port()),
        *ds_target,
        *args,
    ]


def run_command(
    cmd: list[str], *, timeout: int = 300, check: bool = True, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run in a session of its own, so that a timeout kills every rank the launcher started, not only the
    launcher (orphaned ranks would keep CPU, ports and build locks for the rest of the suite)."""
    with subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(env(), **(extra_env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, err = child.communicate()
            raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s\n{err[-4000:]}") from None
    proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


@dataclasses.dataclass
class RankResult:
    returncode: int
    stdout: str
    stderr: str
    exited_after_s: float  # since the ranks were started


def launch_ranks(args: list[str], *, nproc: int, script: str | None = None, timeout: int = 300) -> list[RankResult]:
    """Start each rank as a process of its own, with the variables a launcher sets, so that every rank's exit code,
    output and exit time can be checked (the deepspeed launcher reports one code and kills the other ranks once one
    fails). Output goes to files (a full pipe would block a rank). A timeout kills them all and fails."""
    port = str(free_port())
    target = [script] if script else ["-m", "neuclip_ds.train"]
    with contextlib.ExitStack() as files:
        logs = [
            (files.enter_context(tempfile.TemporaryFile("w+")), files.enter_context(tempfile.TemporaryFile("w+")))
            for _ in range(nproc)
        ]
        started = time.monotonic()
        children = [
            subprocess.Popen(
                [sys.executable, *target, *args],
                cwd=ROOT,
                stdout=out,
                stderr=err,
                start_new_session=True,
                env=dict(
                    env(),
                    RANK=str(r),
                    LOCAL_RANK=str(r),
                    WORLD_SIZE=str(nproc),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port,
                ),
            )
            for r, (out, err) in enumerate(logs)
        ]
        exited: dict[int, float] = {}
        try:
            while len(exited) < nproc:
                for rank, child in enumerate(children):
                    if rank not in exited and child.poll() is not None:
                        exited[rank] = time.monotonic() - started
                if time.monotonic() - started > timeout:
                    raise AssertionError(
                        f"ranks {sorted(set(range(nproc)) - set(exited))} still running after {timeout} s"
                    )
                time.sleep(0.1)
        finally:
            for child in children:
                if child.poll() is None:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
        return [
            RankResult(child.returncode, _read(out), _read(err), exited[rank])
            for rank, (child, (out, err)) in enumerate(zip(children, logs))
        ]


def _read(file) -> str:
    file.seek(0)
    return file.read()


def launch(
    args: list[str],
    *,
    nproc: int = 1,
    module: str = "neuclip_ds.train",
    timeout: int = 300,
    check: bool = True,
    launcher: bool = False,
    port: int | None = None,
) -> subprocess.CompletedProcess:
    return run_command(
        command(args, nproc=nproc, module=module, launcher=launcher, port=port), timeout=timeout, check=check
    )


def spawn(args: list[str], nproc: int, **command_kw) -> subprocess.Popen:
    return subprocess.Popen(
        command(args, nproc=nproc, **command_kw),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_after_step(args: list[str], nproc: int, out: Path, kill_step: int, timeout: int = 300, **command_kw) -> None:
    """Start a run, SIGKILL its whole process group once metrics.jsonl shows `kill_step`."""
    proc = spawn(args, nproc, **command_kw)
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
        child = subprocess.Popen(cmd, cwd=ROOT, env=dict(env(), **(extra_env or {})), stdout=stdout, stderr=stderr)
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
                    f"{' '.join(cmd)} ended (rc {child.returncode}) before step {step}:\n{_read(stderr)[-3000:]}"
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
        return subprocess.CompletedProcess(cmd, child.returncode, _read(stdout), _read(stderr))


def _reached(out: Path, step: int) -> bool:
    path = out / "metrics.jsonl"
    return path.exists() and any(json.loads(ln)["step"] >= step for ln in path.read_text().splitlines() if ln.strip())


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]


def summary(out_dir) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())


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


def launch_script(
    script: str, args: list[str], *, nproc: int = 1, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    return run_command(command(args, nproc=nproc, script=script), timeout=timeout, check=check)
