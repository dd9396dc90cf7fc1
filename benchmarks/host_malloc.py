"""Host allocator settings side by side: the same 1-rank neuclip_ds training run (MBCL, fp32, synthetic data)
under three glibc malloc settings, in lockstep (`_lockstep.py`), per DeepSpeed config:

    python benchmarks/host_malloc.py                      # ViT-B-32, batch 32, zero1 and zero0, 3 repeats
    python benchmarks/host_malloc.py --quick              # the tiny preset (a few minutes)

- `glibc`: glibc's defaults (`--host-malloc glibc`);
- `threshold`: the mmap threshold fixed at glibc's 32 MiB ceiling, trimming off (the same variables through the
  environment): blocks up to 32 MiB stay in the heap, larger ones are mapped anew on every allocation;
- `tuned`: `--host-malloc tuned`, the default (no mmap'ed blocks, trimming off; neuclip_ds/host_malloc.py).

Each repeat runs the three in lockstep, so that they share this machine's minutes; the table gives each setting's
median step, its step ÷ tuned's per repeat (median and spread), and per step its minor page faults and kernel CPU
seconds (getrusage over the timed phases, `_phase_rusage.py`) and the run's peak memory (metrics.jsonl
`peak_mem_gib`: the process's peak resident set on a CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _common import median_spread, report, synthetic_run, train_lockstep

from neuclip_ds.host_malloc import MiB

SETTINGS = {  # name: (neuclip-train arguments, environment)
    "glibc": (["--host-malloc", "glibc"], {}),
    "threshold": (
        [],
        {
            "MALLOC_MMAP_THRESHOLD_": str(32 * MiB),
            "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
            "MALLOC_TOP_PAD_": str(64 * MiB),
        },
    ),
    "tuned": (["--host-malloc", "tuned"], {}),
}


def step_total(row: dict, field: str) -> float:
    """A getrusage field summed over the phases of one step."""
    return sum(phase[field] for phase in row["rusage"].values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny preset, fewer steps and repeats")
    parser.add_argument("--preset", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--ds-configs", default="zero1,zero0", help="comma-separated shipped DeepSpeed configs")
    parser.add_argument("--steps", type=int, default=8, help="steps per run; the first --warmup are dropped")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "host_malloc.md"))
    args = parser.parse_args(argv)
    preset, batch, steps, repeats = (
        ("tiny", 64, 6, 2) if args.quick else (args.preset, args.batch, args.steps, args.repeats)
    )
    warm = min(args.warmup, steps - 1)
    lines = [
        f"command: python benchmarks/host_malloc.py {' '.join(argv or sys.argv[1:])}".rstrip(),
        f"{preset}, global batch {batch}, 1 rank, MBCL, fp32, {steps} steps per run (first {warm} dropped), "
        f"{repeats} repeats, the three settings of a repeat in lockstep, {args.threads} threads; faults and kernel "
        "time per step over the timed phases",
        "",
        "| --ds-config | setting | median step (s) | step ÷ tuned per repeat | median (min–max) "
        "| minor faults per step | kernel CPU per step (s) | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for ds_config in args.ds_configs.split(","):
            base = synthetic_run(preset, "mbcl", batch=batch, steps=steps, ds_config=ds_config)
            repeats_rows = []
            for r in range(repeats):
                print(f"[host_malloc] {ds_config} repeat {r + 1}/{repeats} in lockstep", flush=True)
                order = list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]
                runs = {name: ([*base, *SETTINGS[name][0]], Path(tmp) / f"{ds_config}_{name}_{r}") for name in order}
                envs = {name: SETTINGS[name][1] for name in order}
                repeats_rows.append(
                    train_lockstep(runs, threads=args.threads, keep_checkpoints=False, rusage=True, extra_env=envs)
                )
            medians = {
                name: [statistics.median(row["step_time_s"] for row in rows[name][warm:]) for rows in repeats_rows]
                for name in SETTINGS
            }
            for name in SETTINGS:
                kept = [row for rows in repeats_rows for row in rows[name][warm:]]
                ratios = [a / b for a, b in zip(medians[name], medians["tuned"], strict=True)]
                faults = statistics.median(step_total(row, "ru_minflt") for row in kept)
                kernel = statistics.median(step_total(row, "ru_stime") for row in kept)
                peak = max(row["peak_mem_gib"] for rows in repeats_rows for row in rows[name])
                lines.append(
                    f"| {ds_config} | {name} | {statistics.median(medians[name]):.3f} | "
                    f"{', '.join(f'{x:.3f}' for x in ratios)} | {median_spread(ratios)} | {faults:.0f} | "
                    f"{kernel:.3f} | {peak:.2f} |"
                )
    report("\n".join(lines), args.out, write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
