"""Launch neuclip-train runs in subprocesses (1 rank: python -m; N ranks: the deepspeed launcher, CPU/gloo)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
             PYTHONUNBUFFERED="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def launch(args: list[str], *, nproc: int = 1, module: str = "neuclip_ds.train", timeout: int = 300,
           check: bool = True) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--no_local_rank", "--master_port",
               str(free_port()), "--module", module, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]


def summary(out_dir) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())


def write_ds_config(path: Path, *, stage: int, accumulation: int = 1) -> str:
    path.write_text(json.dumps({"gradient_accumulation_steps": accumulation, "gradient_clipping": 1.0,
                                "zero_optimization": {"stage": stage}}))
    return str(path)


def launch_script(script: str, args: list[str], *, nproc: int = 1, timeout: int = 300,
                  check: bool = True) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--no_local_rank", "--master_port",
               str(free_port()), script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc
