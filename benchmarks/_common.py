"""What the timing benchmarks share: run `neuclip_ds.train` in a subprocess (neuclip_ds.launch) and read its
per-phase step times, and print + write a result table."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

from _pinned import checked_threads

from neuclip_ds.launch import TRAIN_MODULE, cpu_env, launch, metrics

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "benchmarks" / "_pinned.py"  # runs a module with its thread counts pinned and reported
PHASES = ("data", "forward", "gather", "npn", "backward", "optimizer")  # the engine's timers (metrics.jsonl)


def pinned_env(threads: int, *, gpu: bool = False) -> dict[str, str]:
    """The environment of a timed run: `threads` OpenMP threads, and torch's intra- and inter-op threads set to the
    same number by `_pinned.py`; a CPU run (no GPU in sight) unless `gpu`."""
    env = cpu_env(threads, hide_cuda=not gpu, extra_env={"BENCH_THREADS": str(threads)})
    if gpu:  # DeepSpeed then picks its accelerator itself (CUDA), unless the caller chose one
        env.pop("DS_ACCELERATOR")
        if "DS_ACCELERATOR" in os.environ:
            env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    return env


def train(args: list[str], out: Path, *, threads: int, gpu: bool = False) -> list[dict]:
    """One 1-rank `neuclip_ds.train` run on synthetic data (`threads` threads checked at start and exit; CPU with
    no GPU in sight unless `gpu`); its metrics.jsonl rows."""
    args = [TRAIN_MODULE, *args, "--output-dir", str(out), "--report-to", "jsonl"]
    proc = launch(args, script=str(PINNED), env=pinned_env(threads, gpu=gpu), timeout=None, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(proc.args)} failed:\n{proc.stderr[-3000:]}")
    checked_threads(proc.stderr, threads, "neuclip_ds")
    return metrics(out)


def interleaved(trainers: dict, repeats: int, run) -> dict[str, list]:
    """`run(name, repeat)` for every trainer in every repeat, in the order A B C, C B A, A B C, ... (ABBA), so
    that a steady drift of this shared machine hits every trainer alike; {name: [result of each repeat]}."""
    results: dict[str, list] = {name: [] for name in trainers}
    for r in range(repeats):
        for name in list(trainers)[:: 1 if r % 2 == 0 else -1]:
            print(f"[{Path(sys.argv[0]).stem}] {name} repeat {r + 1}/{repeats}", flush=True)
            results[name].append(run(name, r))
    return results


def median_spread(values: list[float], digits: int = 3) -> str:
    """'median (min–max)' of per-repeat figures: the spread is what a reader needs to trust a ratio."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def synthetic_run(preset: str, loss: str, *, batch: int, steps: int, ds_config: str = "zero1") -> list[str]:
    """The speed benchmarks' neuclip-train arguments: `steps` steps of `batch` synthetic samples, fp32, a shipped
    DeepSpeed config (ZeRO-1 unless told), lr 1e-4 after 1 warmup step."""
    args = (
        f"--preset {preset} --loss {loss} --synthetic-samples {batch * steps} --global-batch-size {batch}"
        f" --steps {steps} --precision fp32 --lr 1e-4 --warmup 1"
    ).split()
    return [*args, "--ds-config", ds_config]


def report(text: str, out: str | Path, *, write: bool) -> None:
    print(text)
    if write:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        print(f"\nwritten: {out}")


def mean_std(values, *, digits: int = 2) -> str:
    """'m ± s' (sample std) of the numbers, the number itself for one, 'n/a' for none."""
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
