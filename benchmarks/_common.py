"""What the timing benchmarks share: run `neuclip_ds.train` in a subprocess and read its per-phase step times, and
print + write a result table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "gather", "npn", "backward", "optimizer")  # the engine's timers (metrics.jsonl)


def cpu_env(threads: int) -> dict:
    return dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
    )


def train(args: list[str], out: Path, *, threads: int) -> list[dict]:
    """One 1-rank `neuclip_ds.train` run on synthetic data; its metrics.jsonl rows."""
    cmd = [sys.executable, "-m", "neuclip_ds.train", *args, "--output-dir", str(out), "--report-to", "jsonl"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def step_time(row: dict) -> float:
    return sum(row[f"time_{p}"] for p in PHASES)


def report(text: str, out: str | Path, *, write: bool) -> None:
    print(text)
    if write:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        print(f"\nwritten: {out}")


def mean_std(values, *, digits: int = 2) -> str:
    """'m ± s' (sample std) of the numbers, the number itself for one, 'n/a' for none."""
    import statistics

    values = [float(v) for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(head: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table (cells converted with str)."""
    lines = ["| " + " | ".join(str(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines
