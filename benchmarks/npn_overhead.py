"""NPN overhead: step time of NeuCLIP ÷ MBCL, same preset, batch and DS config (issue 8.1).

    python benchmarks/npn_overhead.py            # tiny + ViT-B-32, T_u = 10, m = 4096
    python benchmarks/npn_overhead.py --quick    # fewer steps (a few minutes on 2 CPU cores)

Each run is `neuclip-train` on synthetic data (no files), 1 rank, fp32, ZeRO-1, timed by the engine's own per-phase
timers (metrics.jsonl: time_data/forward/gather/npn/backward/optimizer). The NeuCLIP and MBCL runs of a preset are
interleaved (A B A B ...) so that drift of this shared machine hits both alike; the ratio is the median step time of
all NeuCLIP steps ÷ that of all MBCL steps, warm-up steps dropped, also given per repeat (its spread is this
machine's noise between runs: ±5 % on 2 shared cores). The in-run ratio step ÷ (step − NPN phase), over the same
NeuCLIP steps, needs no second run and so carries none of that noise; the NPN phase is the only work NeuCLIP adds
to an MBCL step (its loss differs from MBCL's by O(B) terms). Absolute times are not comparable across runs.

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

from _common import PHASES, ROOT, report, step_time, synthetic_run, train


def run(
    preset: str, loss: str, *, batch: int, steps: int, prototypes: int, inner_steps: int, threads: int, out: Path
) -> list[dict]:
    npn = f"--npn-prototypes {prototypes} --npn-inner-steps {inner_steps}".split()
    return train([*synthetic_run(preset, loss, batch=batch, steps=steps), *npn], out, threads=threads)


def npn_flops_share(preset: str, per_gpu_batch: int, world_size: int, prototypes: int, inner_steps: int) -> float:
    """FLOPs of T_u inner steps on the global batch ÷ FLOPs of the encoders' fwd+bwd on the local batch.

    Encoders: 6 × params × tokens (fwd 2, bwd 4 per parameter and token); NPN per inner step and side:
    fwd 2·B·m·d (similarities) + bwd 4·B·m·d."""
    import torch

    from neuclip_ds.model import build_model
    from neuclip_ds.presets import get_preset

    p = get_preset(preset)
    with torch.device("meta"):
        model = build_model(preset)
    vis = sum(x.numel() for x in model.visual.parameters())
    txt = sum(x.numel() for x in model.text.parameters())
    patches = (p.image_size // p.patch_size) ** 2 + 1
    encoder = 6 * per_gpu_batch * (vis * patches + txt * p.context_length)
    d = p.embed_dim
    npn = inner_steps * 2 * 6 * (per_gpu_batch * world_size) * prototypes * d
    return npn / encoder


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
                npn_flops_share(preset, per_gpu_batch, w if mode == "replicated" else 1, prototypes, inner_steps)
                for w in (1, 8, 64)
            ]
            cells = [f"{100 * x:.1f} %" for x in shares]
            lines.append(f"| {preset} | {mode} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--presets", nargs="+", default=["tiny", "ViT-B-32"])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 32], help="global batch per preset")
    parser.add_argument("--prototypes", type=int, default=4096)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "npn_overhead.md"))
    args = parser.parse_args(argv)
    steps, repeats, warm = (6, 1, 2) if args.quick else (10, 3, 3)
    if len(args.batch) != len(args.presets):
        parser.error("--batch: give one global batch per preset")

    lines = [
        f"command: python benchmarks/npn_overhead.py {' '.join(argv or sys.argv[1:])}".rstrip(),
        f"1 rank, fp32, ZeRO-1, T_u = {args.inner_steps}, m = {args.prototypes}, {steps} steps per run "
        f"(first {warm} dropped), {repeats} interleaved repeat(s) per loss, {args.threads} threads",
        "",
        "| preset | global batch | MBCL step (s) | NeuCLIP step (s) | NeuCLIP ÷ MBCL | per repeat "
        "| in-run: step ÷ (step − NPN phase) | NPN phase share | NeuCLIP split data/fwd/gather/npn/bwd/opt (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for preset, batch in zip(args.presets, args.batch):
            times: dict[str, list[float]] = {"mbcl": [], "neuclip": []}
            per_repeat: dict[str, list[float]] = {"mbcl": [], "neuclip": []}
            in_run: list[float] = []
            split = {p: [] for p in PHASES}
            for r in range(repeats):
                for loss in ("neuclip", "mbcl"):
                    print(f"[npn_overhead] {preset} {loss} repeat {r}", flush=True)
                    rows = run(
                        preset,
                        loss,
                        batch=batch,
                        steps=steps,
                        prototypes=args.prototypes,
                        inner_steps=args.inner_steps,
                        threads=args.threads,
                        out=Path(tmp) / f"{preset}_{loss}_{r}",
                    )[warm:]
                    times[loss] += [step_time(row) for row in rows]
                    per_repeat[loss].append(statistics.median(step_time(row) for row in rows))
                    if loss == "neuclip":
                        in_run += [step_time(row) / (step_time(row) - row["time_npn"]) for row in rows]
                        for p in PHASES:
                            split[p] += [row[f"time_{p}"] for row in rows]
            mb, nc = statistics.median(times["mbcl"]), statistics.median(times["neuclip"])
            total = sum(statistics.median(v) for v in split.values())
            shares = "/".join(f"{100 * statistics.median(split[p]) / total:.1f}" for p in PHASES)
            ratios = ", ".join(f"{n / m:.3f}" for n, m in zip(per_repeat["neuclip"], per_repeat["mbcl"]))
            lines.append(
                f"| {preset} | {batch} | {mb:.3f} | {nc:.3f} | **{nc / mb:.3f}** | {ratios} | "
                f"{statistics.median(in_run):.3f} | {100 * statistics.median(split['npn']) / total:.1f} % "
                f"| {shares} |"
            )
    lines += flops_table(args.presets, args.prototypes, args.inner_steps)
    report("\n".join(lines), args.out, write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
