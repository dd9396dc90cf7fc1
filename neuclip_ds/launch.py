"""Launch neuclip_ds runs (or any program) in subprocesses: the one launcher the tests and benchmarks share.

A run of N ranks is started one of two ways:

- the deepspeed launcher (`command(..., nproc=N)`, or `launcher=True` for one rank): what users run, but it
  reports a single exit code and kills the other ranks once one fails;
- one process per rank with the variables a launcher sets (`launch_ranks`: RANK, LOCAL_RANK, WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT), so that every rank's exit code, output and exit time can be checked.

Every child runs in a session of its own, and a timeout (or an interrupt of the caller) kills its whole process
group, not only the launcher: orphaned ranks would keep CPU, ports and torch-extension build locks. The
environment (`cpu_env`) makes the ranks CPU ranks over gloo with a fixed number of threads, and gives them the
interpreter's own torch-extensions folder (neuclip_ds.extensions).
"""

from __future__ import annotations

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
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

from neuclip_ds.extensions import default_extensions_dir

# The folder above the package: the checkout (source tree or editable install), where the relative paths that runs
# are given (configs/, ds_configs/, launchers/, tests/scripts/) resolve. Runs start there unless told otherwise.
REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_MODULE = "neuclip_ds.train"
INTERRUPT_GRACE_S = 5.0  # after an interrupt of the caller, how long a run may take to act on SIGINT before SIGKILL
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")  # set by a launcher for the caller: never inherited by a run


class LaunchError(RuntimeError):
    """A launched program failed (non-zero exit with check=True) or ran past its timeout."""


@dataclasses.dataclass
class RankResult:
    """One rank of `launch_ranks`."""

    returncode: int
    stdout: str
    stderr: str
    exited_after_s: float  # since the ranks were started


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(
    threads: int | None = 1, *, hide_cuda: bool = False, extra_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The caller's environment for CPU ranks: DeepSpeed's CPU accelerator (gloo), `threads` OpenMP threads (None:
    as inherited), unbuffered output, this interpreter's torch-extensions folder, no RANK / WORLD_SIZE of a
    launcher the caller may run under; `hide_cuda` also hides any GPU from torch. `extra_env` is applied last."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(default_extensions_dir()))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    for var in _LAUNCHER_VARS:
        env.pop(var, None)
    env.update(extra_env or {})
    return env


def command(
    args: Sequence[str],
    *,
    nproc: int = 1,
    module: str = TRAIN_MODULE,
    script: str | None = None,
    launcher: bool = False,
    port: int | None = None,
) -> list[str]:
    """The command line of a run: `script` (a file) if given, else `module`, with `args`. One rank: this
    interpreter, unless `launcher`; else the deepspeed launcher with `nproc` ranks on `port` (default: a free one)."""
    target = [script] if script else ["-m", module]
    if nproc == 1 and not launcher:
        return [sys.executable, *target, *args]
    ds_target = [script] if script else ["--module", module]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    port = port or free_port()
    return [deepspeed, "--num_gpus", str(nproc), "--no_local_rank", "--master_port", str(port), *ds_target, *args]


def _env(env: Mapping[str, str] | None, extra_env: Mapping[str, str] | None) -> dict[str, str]:
    return dict(cpu_env() if env is None else env, **(extra_env or {}))


def kill_group(child: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """`sig` to every process of the session `child` leads (started with start_new_session=True): a launcher's or a
    rank's own children go with it; one that has already exited is no error."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, sig)


def run_command(
    cmd: Sequence[str],
    *,
    timeout: float | None = 300,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: str | Path = REPO_ROOT,
) -> subprocess.CompletedProcess:
    """Run `cmd` to its end (stdout and stderr captured as text) in a session of its own, so that a timeout, or an
    exception in the caller, kills every process of its group, not only the launcher (Ctrl-C sends SIGINT first, as
    a terminal would). `env` defaults to `cpu_env()`; `extra_env` goes on top. A timeout (None: none) raises
    LaunchError, so does a non-zero exit code if `check`."""
    cmd = [str(c) for c in cmd]
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=_env(env, extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(child)
            out, err = child.communicate()
            raise LaunchError(f"{' '.join(cmd)} timed out after {timeout} s\n{err[-4000:]}") from None
        except BaseException as e:
            try:
                if isinstance(e, KeyboardInterrupt):  # what Ctrl-C in a terminal does: a launcher script forwards
                    kill_group(child, signal.SIGINT)  # it to ranks in sessions of their own, which stop cleanly
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.wait(timeout=INTERRUPT_GRACE_S)
            finally:
                kill_group(child)
            raise
    proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    if check and proc.returncode != 0:
        raise LaunchError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def launch(
    args: Sequence[str],
    *,
    nproc: int = 1,
    module: str = TRAIN_MODULE,
    script: str | None = None,
    launcher: bool = False,
    port: int | None = None,
    timeout: float | None = 300,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `command(args, ...)` with `run_command`: a neuclip_ds run (or a rank entry-point script) to its end."""
    cmd = command(args, nproc=nproc, module=module, script=script, launcher=launcher, port=port)
    return run_command(cmd, timeout=timeout, check=check, env=env, extra_env=extra_env)


def launch_ranks(
    args: Sequence[str],
    *,
    nproc: int,
    module: str = TRAIN_MODULE,
    script: str | None = None,
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: str | Path = REPO_ROOT,
) -> list[RankResult]:
    """Start each rank as a process of its own (no launcher, which would report one code and kill the other ranks
    once one fails), so that every rank's exit code, output and exit time can be checked. Output goes to files
    (a full pipe would block a rank). A timeout kills them all and raises LaunchError."""
    port = str(free_port())
    target = [script] if script else ["-m", module]
    base_env = _env(env, extra_env)
    with contextlib.ExitStack() as files:
        logs = [
            (files.enter_context(tempfile.TemporaryFile("w+")), files.enter_context(tempfile.TemporaryFile("w+")))
            for _ in range(nproc)
        ]
        started = time.monotonic()
        children: list[subprocess.Popen] = []
        exited: dict[int, float] = {}
        try:  # from the first start on: a rank that fails to start leaves none of those already started running
            for r, (out, err) in enumerate(logs):
                children.append(
                    subprocess.Popen(
                        [sys.executable, *target, *args],
                        cwd=cwd,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,
                        env=dict(
                            base_env,
                            RANK=str(r),
                            LOCAL_RANK=str(r),
                            WORLD_SIZE=str(nproc),
                            MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port,
                        ),
                    )
                )
            while len(exited) < nproc:
                for rank, child in enumerate(children):
                    if rank not in exited and child.poll() is not None:
                        exited[rank] = time.monotonic() - started
                if time.monotonic() - started > timeout:
                    raise LaunchError(
                        f"ranks {sorted(set(range(nproc)) - set(exited))} still running after {timeout} s"
                    )
                time.sleep(0.1)
        finally:
            for child in children:
                if child.poll() is None:
                    kill_group(child)
                    child.wait()
        return [
            RankResult(child.returncode, read_back(out), read_back(err), exited[rank])
            for rank, (child, (out, err)) in enumerate(zip(children, logs))
        ]


def read_back(file: typing.IO[str]) -> str:
    """The whole text of a file a child wrote to (a TemporaryFile given as its stdout or stderr)."""
    file.seek(0)
    return file.read()


def metrics(out_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; a line still being written (a run going on, or killed) is skipped."""
    from neuclip_ds.metrics import read_metrics  # not at the top: metrics.py imports tqdm and the config

    return read_metrics(Path(out_dir) / "metrics.jsonl")


def last_step(out_dir: str | Path) -> int:
    """The last step a run's metrics.jsonl shows so far (0: no file yet, or no complete line)."""
    path = Path(out_dir) / "metrics.jsonl"
    return max((row.get("step", 0) for row in metrics(out_dir)), default=0) if path.exists() else 0


def summary(out_dir: str | Path) -> dict:
    """A finished run's summary.json."""
    return json.loads((Path(out_dir) / "summary.json").read_text())
