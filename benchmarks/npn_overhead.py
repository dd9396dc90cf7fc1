"""NPN overhead: step time of NeuCLIP ÷ MBCL, same preset, batch and DS config (issue 8.1).

    python benchmarks/npn_overhead.py            # tiny + ViT-B-32, T_u = 10, m = 4096
    python benchmarks/npn_overhead.py --quick    # fewer steps (a few minutes on 2 CPU cores)
    python benchmarks/npn_overhead.py --presets ViT-B-32 --batch 32 --profile   # + where the difference goes

Each run is `neuclip-train` on synthetic data (no files), 1 rank, fp32, `--ds-config` (zero1 unless told), its threads
pinned and checked (`_pinned.py`). The NeuCLIP and MBCL runs of a repeat run in lockstep (`_lockstep.py`): two
separate processes at the same time, each step of one after a step of the other, so that both see the same minutes of
this shared machine, whose speed drifts by 10-20 % over minutes; `--sequential` runs them one after the other instead
(N M, M N, ...), which leaves that drift in each repeat's ratio. A step's time is its wall time (metrics.jsonl
`step_time_s`); each repeat gives a ratio of the median NeuCLIP step ÷ the median MBCL step, and the table shows every
repeat's ratio with their median and spread. The in-run ratio step ÷ (step − NPN phase), over the same NeuCLIP steps,
needs no second run; the NPN phase is the only work NeuCLIP adds to an MBCL step (its loss differs from MBCL's by O(B)
terms), so the two ratios agree unless something outside that phase costs NeuCLIP steps too. The second table splits
both losses' steps by the engine's phase timers (time_data/forward/gather/npn/backward/optimizer) and what no timer
covers, side by side, so that such a cost shows where it is. `--profile` then runs each loss once more (in lockstep
unless `--sequential`) under `--profile-steps` (the kept steps; torch.profiler, neuclip_ds/profiling.py) and lists the
operators whose self time per step differs most between the two, with each one's calls and seconds per step.

What the ratio means at scale: with `--npn-parallel replicated` (E8 option (a)) every rank runs the inner loop on
the *global* batch, so its cost per rank grows with B_global while the encoders' grows with b_local; with
`sharded` (option (b), the default) each rank runs its own b_local rows and all-reduces the NPN gradients
(2·m·d numbers per inner step, not counted in the FLOPs). `flops_table` prints both FLOP ratios for a per-GPU
batch and world size (the paper: 6-9 % of the step time on 8×H100).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _common import PHASES, ROOT, interleaved, median_spread, report, synthetic_run, train, train_lockstep

from neuclip_ds.flops import npn_flops_share
from neuclip_ds.presets import get_preset
from neuclip_ds.profiling import read_ops

LOSSES = ("neuclip", "mbcl")
CONTROL = "mbcl_control"  # --control: a second MBCL run beside the first (an A/A pair: this harness's own noise)


def loss_of(run: str) -> str:
    return "mbcl" if run == CONTROL else run


def flops_table(presets: list[str], prototypes: int, inner_steps: int, per_gpu_batch: int = 256) -> list[str]:
    """NPN FLOPs ÷ encoder FLOPs per rank: replicated (E8 (a)) runs the inner loop on the global batch on every
    rank; sharded (E8 (b), the default) on the rank's own b_local rows, whatever the world size."""
    lines = [
        "",
        f"FLOP share of the NPN inner loop ÷ encoders fwd+bwd per rank, per-GPU batch {per_gpu_batch}, "
        f"T_u = {inner_steps}, m = {prototypes}:",
        "",
        "| preset | --npn-parallel | 1 GPU | 8 GPUs | 64 GPUs |",
        "|---|---|---|---|---|",
    ]
    for preset in (p for p in presets if p != "tiny"):
        for mode in ("replicated", "sharded"):
            shares = [
                npn_flops_share(
                    get_preset(preset),
                    per_rank_batch=per_gpu_batch,
                    world_size=w,
                    prototypes=prototypes,
                    inner_steps=inner_steps,
                    parallel=mode,
                )
                for w in (1, 8, 64)
            ]
            cells = [f"{100 * x:.1f} %" for x in shares]
            lines.append(f"| {preset} | {mode} | " + " | ".join(cells) + " |")
    return lines


def operator_differences(neuclip: dict[str, dict], mbcl: dict[str, dict], top: int) -> list[str]:
    """The `top` operators whose self time per step (CPU + device) differs most between the two profiles, as
    table lines; the profiler's own bookkeeping and the phase ranges (which contain the operators) are left out."""
    phases = set(PHASES)

    def self_s(ops: dict[str, dict], name: str) -> float:
        row = ops.get(name)
        return 0.0 if row is None else row["self_cpu_s_per_step"] + row["self_device_s_per_step"]

    def calls(ops: dict[str, dict], name: str) -> str:
        return f"{ops[name]['calls_per_step']:.0f}" if name in ops else "0"

    names = [n for n in set(neuclip) | set(mbcl) if n not in phases and not n.startswith("ProfilerStep")]
    names.sort(key=lambda n: -abs(self_s(neuclip, n) - self_s(mbcl, n)))
    lines = [
        "| operator | NeuCLIP calls | MBCL calls | NeuCLIP self (s) | MBCL self (s) | difference (s) |",
        "|---|---|---|---|---|---|",
    ]
    for n in names[:top]:
        a, b = self_s(neuclip, n), self_s(mbcl, n)
        lines.append(f"| `{n}` | {calls(neuclip, n)} | {calls(mbcl, n)} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    total = [sum(self_s(ops, n) for n in ops if n not in phases) for ops in (neuclip, mbcl)]
    lines.append(f"| all operators | | | {total[0]:.4f} | {total[1]:.4f} | {total[0] - total[1]:+.4f} |")
    return lines


def rusage_lines(preset: str, loss: str, rows: list[dict]) -> list[str]:
    """Table lines: each timed phase's median resource use per step (rows from `train_lockstep(rusage=True)`)."""
    lines = []
    for phase in PHASES:
        used = [row["rusage"][phase] for row in rows if phase in row["rusage"]]
        wall = statistics.median(row[f"time_{phase}"] for row in rows)
        if not used or wall < 0.01:
            continue  # a phase this loss does not have (MBCL's npn), or too short to say anything

        def med(field: str, used: list[dict] = used) -> float:
            return statistics.median(u[field] for u in used)

        lines.append(
            f"| {preset} | {loss} | {phase} | {wall:.3f} | {med('ru_utime'):.3f} | {med('ru_stime'):.3f} | "
            f"{med('ru_minflt'):.0f} | {med('ru_nvcsw'):.0f} | {med('ru_nivcsw'):.0f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--presets", nargs="+", default=["tiny", "ViT-B-32"])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 32], help="global batch per preset")
    parser.add_argument("--prototypes", type=int, default=4096)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="steps per run; the first --warmup are dropped")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ds-config", default="zero1", help="the shipped DeepSpeed config both losses run under")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="one run after the other (N M, M N, ...) instead of both runs of a repeat in lockstep",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run a second MBCL run in each repeat: MBCL ÷ MBCL shows the noise of the ratio itself",
    )
    parser.add_argument(
        "--profile", action="store_true", help="then profile one more run of each loss and compare operators"
    )
    parser.add_argument("--profile-top", type=int, default=15, help="operators listed by --profile")
    parser.add_argument(
        "--rusage",
        action="store_true",
        help="also count each phase's page faults, CPU time and context switches (getrusage; lockstep only)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "npn_overhead.md"))
    args = parser.parse_args(argv)
    steps, repeats, warm = (6, 2, 2) if args.quick else (args.steps, args.repeats, args.warmup)
    if len(args.batch) != len(args.presets):
        parser.error("--batch: give one global batch per preset")
    if args.rusage and args.sequential:
        parser.error("--rusage: counted in lockstep runs only (drop --sequential)")

    lines = [
        f"command: python benchmarks/npn_overhead.py {' '.join(argv or sys.argv[1:])}".rstrip(),
        f"1 rank, fp32, --ds-config {args.ds_config}, T_u = {args.inner_steps}, m = {args.prototypes}, {steps} "
        f"steps per run (first {warm} dropped), {repeats} repeats, "
        + (
            "one run after the other (N M, M N, ...)"
            if args.sequential
            else f"each a NeuCLIP and {'two MBCL runs' if args.control else 'an MBCL run'} in lockstep (separate "
            "processes taking their steps in turn)"
        )
        + f", {args.threads} intra-op and inter-op threads checked in every run; step = wall time from fetching the "
        "batch to the end of the optimizer step",
        "",
        "| preset | global batch | MBCL step (s) | NeuCLIP step (s) | NeuCLIP ÷ MBCL per repeat "
        "| median (min–max) | in-run: step ÷ (step − NPN phase) |",
        "|---|---|---|---|---|---|---|",
    ]
    splits = [
        "",
        "Where the step goes (median seconds per phase over all kept steps; untimed = step − the phases):",
        "",
        "| preset | loss | " + " | ".join(PHASES) + " | untimed | step |",
        "|---|---|" + "---|" * (len(PHASES) + 2),
    ]
    profiles: list[str] = []
    usage = [
        "",
        "Resource use per phase (median per step over all kept steps, the whole process: user and kernel CPU seconds "
        "of both threads, minor page faults, voluntary and involuntary context switches; getrusage, --rusage):",
        "",
        "| preset | loss | phase | wall (s) | user (s) | kernel (s) | minor faults | voluntary | involuntary |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    controls = [
        "",
        "Control: the same MBCL run twice in each repeat (MBCL ÷ MBCL control: the noise of a ratio of two runs):",
        "",
        "| preset | global batch | MBCL ÷ MBCL control per repeat | median (min–max) |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for preset, batch in zip(args.presets, args.batch, strict=True):

            def run_args(name: str, preset: str = preset, batch: int = batch) -> list[str]:
                loss = loss_of(name)
                npn = f"--npn-prototypes {args.prototypes} --npn-inner-steps {args.inner_steps}".split()
                return [*synthetic_run(preset, loss, batch=batch, steps=steps, ds_config=args.ds_config), *npn]

            def one_pair(
                r: int | str, extra: tuple = (), names: tuple = LOSSES, preset: str = preset
            ) -> dict[str, list[dict]]:
                """The runs of repeat r, in lockstep (each repeat's first step alternates N M, M N)."""
                order = names if r == "profiled" or r % 2 == 0 else names[::-1]
                ring = {name: ([*run_args(name), *extra], Path(tmp) / f"{preset}_{name}_{r}") for name in order}
                return {
                    name: rows[warm:]
                    for name, rows in train_lockstep(
                        ring, threads=args.threads, keep_checkpoints=False, rusage=args.rusage
                    ).items()
                }

            def one_run(name: str, r: int | str, extra: tuple = (), preset: str = preset) -> list[dict]:
                out = Path(tmp) / f"{preset}_{name}_{r}"
                return train([*run_args(name), *extra], out, threads=args.threads, keep_checkpoints=False)[warm:]

            names = (*LOSSES, CONTROL) if args.control else LOSSES
            if args.sequential:
                runs = interleaved(dict.fromkeys(names), repeats, one_run)
            else:
                rings = []
                for r in range(repeats):
                    print(f"[npn_overhead] {preset} repeat {r + 1}/{repeats} in lockstep", flush=True)
                    rings.append(one_pair(r, names=names))
                runs = {name: [ring[name] for ring in rings] for name in names}
            per_repeat = {
                loss: [statistics.median(row["step_time_s"] for row in rows) for rows in reps]
                for loss, reps in runs.items()
            }
            ratios = [n / m for n, m in zip(per_repeat["neuclip"], per_repeat["mbcl"], strict=True)]
            in_run = [
                row["step_time_s"] / (row["step_time_s"] - row["time_npn"]) for rows in runs["neuclip"] for row in rows
            ]
            mb, nc = (statistics.median(v) for v in (per_repeat["mbcl"], per_repeat["neuclip"]))
            lines.append(
                f"| {preset} | {batch} | {mb:.3f} | {nc:.3f} | {', '.join(f'{x:.3f}' for x in ratios)} | "
                f"**{median_spread(ratios)}** | {statistics.median(in_run):.3f} |"
            )
            if args.control:
                same = [a / b for a, b in zip(per_repeat["mbcl"], per_repeat[CONTROL], strict=True)]
                controls.append(
                    f"| {preset} | {batch} | {', '.join(f'{x:.3f}' for x in same)} | {median_spread(same)} |"
                )
            for loss, reps in runs.items():
                rows = [row for rows in reps for row in rows]
                phase = {p: statistics.median(row[f"time_{p}"] for row in rows) for p in PHASES}
                untimed = statistics.median(row["step_time_s"] - sum(row[f"time_{p}"] for p in PHASES) for row in rows)
                step = statistics.median(row["step_time_s"] for row in rows)
                cells = " | ".join(f"{phase[p]:.3f}" for p in PHASES)
                splits.append(f"| {preset} | {loss} | {cells} | {untimed:.3f} | {step:.3f} |")
                if args.rusage:
                    usage += rusage_lines(preset, loss, rows)
            if args.profile:
                profiled = f"--profile-steps {warm + 1}:{steps}".split()
                print(f"[npn_overhead] {preset} profiled", flush=True)
                if args.sequential:
                    for loss in LOSSES:
                        one_run(loss, "profiled", extra=profiled)
                else:
                    one_pair("profiled", extra=profiled)
                ops = {
                    loss: read_ops(Path(tmp) / f"{preset}_{loss}_profiled" / "profile" / "rank0_ops.json")
                    for loss in LOSSES
                }
                profiles += [
                    "",
                    f"{preset}: operators whose self time per step differs most, NeuCLIP vs MBCL (torch.profiler over "
                    f"steps {warm + 1}–{steps} of one more run each; profiled steps run slower than the timed ones):",
                    "",
                    *operator_differences(ops["neuclip"], ops["mbcl"], args.profile_top),
                ]
    lines += (controls if args.control else []) + splits + (usage if args.rusage else []) + profiles
    lines += flops_table(args.presets, args.prototypes, args.inner_steps)
    report("\n".join(lines), args.out, write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
