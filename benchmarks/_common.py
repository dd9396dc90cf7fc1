"""What the timing benchmarks share: run `neuclip_ds.train` in a subprocess (neuclip_ds.launch) and read its
per-phase step times, and print + write a result table."""

from __future__ import annotations

from pathlib import Path

from neuclip_ds.launch import cpu_env, launch, metrics

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "gather", "npn", "backward", "optimizer")  # the engine's timers (metrics.jsonl)


def train(args: list[str], out: Path, *, threads: int) -> list[dict]:
    """One 1-rank `neuclip_ds.train` run on synthetic data (CPU, `threads` threads, no GPU in sight); its
    metrics.jsonl rows."""
    args = [*args, "--output-dir", str(out), "--report-to", "jsonl"]
    proc = launch(args, env=cpu_env(threads, hide_cuda=True), timeout=None, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(proc.args)} failed:\n{proc.stderr[-3000:]}")
    return metrics(out)


def synthetic_run(preset: str, loss: str, *, batch: int, steps: int) -> list[str]:
    """The speed benchmarks' neuclip-train arguments: `steps` steps of `batch` synthetic samples, fp32, ZeRO-1,
    lr 1e-4 after 1 warmup step."""
    args = (
        f"--preset {preset} --loss {loss} --synthetic-samples {batch * steps} --global-batch-size {batch}"
        f" --steps {steps} --precision fp32 --lr 1e-4 --warmup 1"
    ).split()
    return [*args, "--ds-config", str(ROOT / "ds_configs" / "zero1.json")]


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
