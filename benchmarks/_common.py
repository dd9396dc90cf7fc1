"""What the timing benchmarks share: run `neuclip_ds.train` in a subprocess (neuclip_ds.launch), alone or in
lockstep with other runs (_lockstep.py), and read its per-phase step times, and print + write a result table."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _lockstep import ENV as LOCKSTEP_ENV
from _lockstep import checked_turns, ring, spec
from _phase_rusage import ENV as RUSAGE_ENV
from _phase_rusage import per_step
from _pinned import checked_threads

from neuclip_ds.launch import TRAIN_MODULE, command, cpu_env, kill_group, launch, metrics
from neuclip_ds.rundir import CHECKPOINTS

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "benchmarks" / "_pinned.py"  # runs a module with its thread counts pinned and reported
PHASES = ("data", "forward", "gather", "npn", "backward", "optimizer")  # the engine's timers (metrics.jsonl)


def pinned_env(threads: int, *, gpu: bool = False, rusage: bool = False) -> dict[str, str]:
    """The environment of a timed run: `threads` OpenMP threads, and torch's intra- and inter-op threads set to the
    same number by `_pinned.py`; a CPU run (no GPU in sight) unless `gpu`; `rusage`: each step's resource use per
    phase reported (`_phase_rusage.py`)."""
    extra = {"BENCH_THREADS": str(threads), **({RUSAGE_ENV: "1"} if rusage else {})}
    env = cpu_env(threads, hide_cuda=not gpu, extra_env=extra)
    if gpu:  # DeepSpeed then picks its accelerator itself (CUDA), unless the caller chose one
        env.pop("DS_ACCELERATOR")
        if "DS_ACCELERATOR" in os.environ:
            env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    return env


def drop_checkpoints(out: Path) -> None:
    """A timed run's checkpoints are of no use to its benchmark, and a ViT-B-32 one is 1.8 GB: 15 runs of a
    benchmark would fill the disk."""
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def train(args: list[str], out: Path, *, threads: int, gpu: bool = False, keep_checkpoints: bool = True) -> list[dict]:
    """One 1-rank `neuclip_ds.train` run on synthetic data (`threads` threads checked at start and exit; CPU with
    no GPU in sight unless `gpu`); its metrics.jsonl rows. `keep_checkpoints=False` deletes its checkpoints."""
    args = [TRAIN_MODULE, *args, "--output-dir", str(out), "--report-to", "jsonl"]
    try:
        proc = launch(args, script=str(PINNED), env=pinned_env(threads, gpu=gpu), timeout=None, check=False)
    finally:
        if not keep_checkpoints:
            drop_checkpoints(out)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(proc.args)} failed:\n{proc.stderr[-3000:]}")
    checked_threads(proc.stderr, threads, "neuclip_ds")
    return metrics(out)


def run_lockstep(
    commands: dict[str, list[str]],
    env: dict[str, str],
    *,
    timeout: float | None = None,
    extra_env: dict[str, dict[str, str]] | None = None,
) -> dict[str, str]:
    """The commands as processes at the same time, taking their steps in turn in the dict's order (each in a ring
    place of its own, `_lockstep.py`); {name: its stderr}. `extra_env` ({name: variables}) goes on top of `env` for
    that command. A process that fails, or the `timeout` (None: none), kills them all (the others would wait for
    its turn for ever) and raises SystemExit with its stderr's tail."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as files:
        folder = ring(Path(tmp) / "ring", len(commands))
        # stderr into files: a full pipe would block a process that nobody reads while it waits for its turn
        errs = {name: files.enter_context(open(Path(tmp) / f"{i}.stderr", "w+")) for i, name in enumerate(commands)}
        children: dict[str, subprocess.Popen] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for i, (name, cmd) in enumerate(commands.items()):
                child_env = dict(
                    env, **(extra_env or {}).get(name, {}), **{LOCKSTEP_ENV: spec(folder, i, len(commands))}
                )
                children[name] = subprocess.Popen(
                    cmd, env=child_env, stdout=subprocess.DEVNULL, stderr=errs[name], start_new_session=True
                )
            running = set(children)
            while running:
                for name in sorted(running):
                    if children[name].poll() is None:
                        continue
                    running.discard(name)
                    if children[name].returncode != 0:
                        errs[name].seek(0)
                        why = f"exited {children[name].returncode}"
                        raise SystemExit(f"{name}: {' '.join(commands[name])} {why}:\n{errs[name].read()[-3000:]}")
                if deadline is not None and time.monotonic() > deadline:
                    raise SystemExit(f"lockstep runs {sorted(running)} still running after {timeout} s")
                time.sleep(0.2)
        finally:
            for child in children.values():
                if child.poll() is None:
                    kill_group(child)
                    child.wait()
        for err in errs.values():
            err.seek(0)
        return {name: err.read() for name, err in errs.items()}


def train_lockstep(
    runs: dict[str, tuple[list[str], Path]],
    *,
    threads: int,
    keep_checkpoints: bool = True,
    rusage: bool = False,
    extra_env: dict[str, dict[str, str]] | None = None,
) -> dict[str, list[dict]]:
    """1-rank `neuclip_ds.train` runs ({name: (arguments, output folder)}) as separate processes on the same
    minutes of this machine: they take their steps in turn, one step of each after the other (`run_lockstep`, with
    its `extra_env`); {name: its metrics.jsonl rows}. Threads and checkpoints as in `train`. `rusage`: each row also
    holds its step's resource use per phase under "rusage" ({phase: {getrusage field: delta}}, `_phase_rusage.py`)."""
    commands = {
        name: command([TRAIN_MODULE, *args, "--output-dir", str(out), "--report-to", "jsonl"], script=str(PINNED))
        for name, (args, out) in runs.items()
    }
    try:
        outputs = run_lockstep(commands, pinned_env(threads, rusage=rusage), extra_env=extra_env)
    finally:
        if not keep_checkpoints:
            for _, out in runs.values():
                drop_checkpoints(out)
    turns = checked_turns(outputs)
    rows = {name: metrics(out) for name, (_, out) in runs.items()}
    for name, stderr in outputs.items():
        checked_threads(stderr, threads, name)
        if turns[name] < len(rows[name]):  # the hook must have held every step
            raise SystemExit(f"{name}: {len(rows[name])} steps but {turns[name]} turns taken: not in lockstep")
        if rusage:
            used = per_step(stderr)
            if len(used) != len(rows[name]):
                raise SystemExit(f"{name}: {len(rows[name])} steps but {len(used)} [rusage] reports")
            for row, step in zip(rows[name], used, strict=True):
                row["rusage"] = step
    return rows


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
