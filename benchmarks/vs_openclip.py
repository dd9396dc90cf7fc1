"""Throughput against OpenCLIP's trainer: neuclip_ds (1 rank, MBCL) vs `open_clip_train.main`, same model
(ViT-B-32), batch, precision, optimizer, clipping and synthetic data (issues 8.2 and 16).

    make openclip-venv                                        # once: .venv-openclip (torch + torchvision
                                                              # + open_clip_torch[training] + neuclip_ds)
    .venv-openclip/bin/python benchmarks/vs_openclip.py                    # fp32, 5 repeats
    .venv-openclip/bin/python benchmarks/vs_openclip.py --precision bf16,fp32 --ds-configs zero0 \
        --paddings max_length                                 # bf16 vs amp_bf16, and bf16 ÷ fp32 of each
    .venv-openclip/bin/python benchmarks/vs_openclip.py --quick

Both trainers run in the same interpreter and torch (open_clip needs torchvision, which does not import beside the
core venv's torch wheel), each started through `_pinned.py`, which sets torch's intra- and inter-op threads to
`--threads` and reports them at start and exit (a run whose threads changed is an error). The runs are interleaved
A B C, C B A, ... over `--repeats` repeats so that drift of this shared machine hits every trainer alike, and each
repeat gives its own ratio (ours ÷ open_clip, from the medians of that repeat's steps); the table shows the median
of the per-repeat ratios and their spread.

A step's time is wall time on both sides: neuclip_ds's `step_time_s` (metrics.jsonl: from fetching the batch to
the end of the optimizer step) and open_clip's `Batch (t)` (its log, --log-every-n-steps 1: from the end of one step
to the end of the next). The data wait of each is shown beside it: open_clip decodes its synthetic images in a
loader worker, our synthetic set is in memory. Ours runs under each of `--ds-configs` (default zero0, which
partitions nothing, as one rank needs, and zero1), each with the default --text-padding longest (the text tower on
the batch's longest caption, exact) and with max_length (all 77 positions, as open_clip runs them). On a CPU,
open_clip's amp_bf16 (a CUDA autocast, a no-op there) runs as `torch.autocast("cpu", dtype=torch.bfloat16)` through
`_openclip_cpu_amp.py`.
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import sys
import tempfile
from pathlib import Path

from _common import PINNED, ROOT, interleaved, median_spread, pinned_env, report, synthetic_run, train
from _pinned import checked_threads

from neuclip_ds.host_malloc import as_environment
from neuclip_ds.launch import run_command

# what _openclip_cpu_amp.py prints when open_clip's amp_bf16 runs under a CPU bf16 autocast
CPU_AMP_USED = "[cpu-amp] open_clip amp_bf16 runs under torch.autocast('cpu', dtype=torch.bfloat16)"
OPENCLIP_LINE = re.compile(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+),")
OPENCLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}
TARGETS = {  # ours ÷ open_clip, end to end (issue 16), by (precision, text padding)
    ("fp32", "longest"): 1.4,
    ("fp32", "max_length"): 1.05,
    ("bf16", "max_length"): 1.0,
}


def ours(
    model: str, batch: int, steps: int, threads: int, out: Path, precision: str, text_padding: str, ds_config: str
) -> list[tuple[float, float]]:
    """(step seconds, data seconds) of each neuclip_ds step."""
    args = [
        *synthetic_run(model, "mbcl", batch=batch, steps=steps, ds_config=ds_config),
        *f"--wd 0.2 --text-padding {text_padding} --precision {precision}".split(),
    ]
    return [(r["step_time_s"], r["time_data"]) for r in train(args, out, threads=threads, keep_checkpoints=False)]


def theirs(
    model: str,
    batch: int,
    steps: int,
    threads: int,
    out: Path,
    precision: str,
    *,
    gpu: bool = False,
    workers: int = 1,
    malloc: str = "released",
) -> list[tuple[float, float]]:
    """(step seconds, data seconds) of each open_clip step, from its log; on CPU with no GPU in sight unless `gpu`
    (open_clip then takes the GPU). `workers` data-loader workers decode its synthetic images. `malloc` "tuned":
    glibc malloc set up as our --host-malloc tuned does, through the environment (open_clip leaves it as found)."""
    run = (
        f"--model {model} --dataset-type synthetic --train-num-samples {batch * steps} --batch-size {batch} --epochs 1"
        f" --precision {OPENCLIP_PRECISION[precision]} --workers {workers} --lr 1e-4 --warmup 1 --wd 0.2"
        " --grad-clip-norm 1.0 --log-every-n-steps 1 --name run --save-frequency 0 --zeroshot-frequency 0"
        " --val-frequency 0 --seed 0"
    ).split()
    cpu_amp = precision == "bf16" and not gpu  # open_clip's amp_bf16 is a CUDA autocast: a no-op on a CPU
    module = "_openclip_cpu_amp" if cpu_amp else "open_clip_train.main"
    cmd = [sys.executable, str(PINNED), module, *run, "--logs", str(out)]
    env = pinned_env(threads, gpu=gpu) | (as_environment() if malloc == "tuned" else {})
    proc = run_command(cmd, cwd=out, env=env, timeout=None, check=False)
    log = out / "run" / "out.log"
    text = log.read_text() if log.is_file() else proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"open_clip failed:\n{text[-3000:]}\n{proc.stderr[-2000:]}")
    checked_threads(proc.stderr, threads, "open_clip")
    if cpu_amp and CPU_AMP_USED not in proc.stderr:
        raise SystemExit("open_clip: its amp_bf16 did not run under the CPU bf16 autocast (_openclip_cpu_amp.py)")
    return [(float(b), float(d)) for d, b in OPENCLIP_LINE.findall(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, 6 steps, 2 repeats")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="steps per run; the first --warmup are dropped")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--precision",
        default="fp32",
        help="comma list of fp32, bf16: both trainers run in each (open_clip's bf16 is amp_bf16); with two, the "
        "table adds each trainer's bf16 ÷ fp32",
    )
    parser.add_argument(
        "--ds-configs",
        default="zero0,zero1",
        help="ours runs under each of these shipped DeepSpeed configs (comma list), with each of --paddings",
    )
    parser.add_argument("--paddings", default="longest,max_length", help="ours runs with each --text-padding")
    parser.add_argument(
        "--openclip-malloc",
        default="released",
        help="comma list of released (glibc's defaults, as open_clip_train runs) and tuned (the glibc settings of "
        "our --host-malloc tuned, given to open_clip through the environment); ratios are against the first",
    )
    parser.add_argument("--out", default=None, help="default: benchmarks/results/vs_openclip[_bf16...].md")
    args = parser.parse_args(argv)
    precisions = args.precision.split(",")
    if not precisions or any(p not in OPENCLIP_PRECISION for p in precisions):
        parser.error(f"--precision: a comma list of {', '.join(OPENCLIP_PRECISION)}, got {args.precision!r}")
    try:
        import open_clip_train  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            "vs_openclip: open_clip_train is not installed in this interpreter; run `make "
            "openclip-venv` and use .venv-openclip/bin/python"
        ) from e
    import open_clip
    import torch

    batch, steps, repeats, warm = (16, 6, 2, 2) if args.quick else (args.batch, args.steps, args.repeats, args.warmup)
    if steps <= warm:
        raise SystemExit("--steps must exceed --warmup")

    def label(prec: str) -> str:  # the precision in a trainer's name, only when several are compared
        return f" {prec}" if len(precisions) > 1 else ""

    mallocs = args.openclip_malloc.split(",")
    if not mallocs or any(m not in ("released", "tuned") for m in mallocs):
        parser.error(f"--openclip-malloc: a comma list of released, tuned, got {args.openclip_malloc!r}")

    def openclip_name(prec: str, malloc: str) -> str:  # the first malloc setting is the reference: plain name
        return f"open_clip{label(prec)}" + ("" if malloc == mallocs[0] else f" ({malloc} malloc)")

    settings = {}  # our trainer's name -> (ds config, text padding, precision)
    openclip = {}  # open_clip's trainer name -> (malloc setting, precision)
    for prec in precisions:
        for ds in args.ds_configs.split(","):
            for padding in args.paddings.split(","):
                settings[f"neuclip_ds {ds} {padding}{label(prec)}"] = (ds, padding, prec)
        for malloc in mallocs:
            openclip[openclip_name(prec, malloc)] = (malloc, prec)
    trainers = {
        name: functools.partial(
            ours, args.model, batch, steps, args.threads, precision=prec, text_padding=padding, ds_config=ds
        )
        for name, (ds, padding, prec) in settings.items()
    } | {
        name: functools.partial(theirs, args.model, batch, steps, args.threads, precision=prec, malloc=malloc)
        for name, (malloc, prec) in openclip.items()
    }
    with tempfile.TemporaryDirectory() as tmp:

        def run(name: str, r: int) -> list[tuple[float, float]]:
            out = Path(tmp) / f"{list(trainers).index(name)}_{r}"
            out.mkdir()
            rows = trainers[name](out=out)
            if len(rows) < steps:
                raise SystemExit(f"{name}: expected {steps} step timings, got {len(rows)}")
            return rows[warm:steps]

        times = interleaved(trainers, repeats, run)

    def rate(rows: list[tuple[float, float]]) -> float:
        return batch / statistics.median(s for s, _ in rows)

    def ratios(a: str, b: str) -> list[float]:  # per repeat: samples/s of a ÷ of b
        return [rate(x) / rate(y) for x, y in zip(times[a], times[b], strict=True)]

    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"command: {Path(sys.executable).parent.parent.name}/bin/python benchmarks/vs_openclip.py {cmd}".rstrip(),
        f"{args.model}, batch {batch}, {' and '.join(f'{p} (open_clip: {OPENCLIP_PRECISION[p]})' for p in precisions)}"
        f", 1 process, torch {torch.__version__}, open_clip {open_clip.__version__}; {args.threads} intra-op and "
        f"inter-op threads for both trainers, checked at start and exit of every run; {steps} steps per run (first "
        f"{warm} dropped), {repeats} repeats interleaved A B C, C B A, ...",
        "",
        "| trainer | samples/s per repeat | median data wait (s) |",
        "|---|---|---|",
    ]
    for name, reps in times.items():
        per_repeat = ", ".join(f"{rate(rows):.2f}" for rows in reps)
        wait = statistics.median(d for rows in reps for _, d in rows)
        lines.append(f"| {name} | {per_repeat} | {wait:.3f} |")
    lines += ["", "| ours ÷ open_clip | per repeat | median (min–max) | target |", "|---|---|---|---|"]
    for name, (_, padding, prec) in settings.items():
        per_repeat = ratios(name, openclip_name(prec, mallocs[0]))
        target = TARGETS.get((prec, padding))
        met = target is not None and statistics.median(per_repeat) >= target
        verdict = "—" if target is None else f"≥ {target}: {'met' if met else 'not met'}"
        cells = ", ".join(f"{x:.3f}" for x in per_repeat)
        lines.append(
            f"| {name}{'' if label(prec) else f' {prec}'} | {cells} | **{median_spread(per_repeat)}** | {verdict} |"
        )
    for other in mallocs[1:]:  # the same ratios against open_clip under the other malloc setting, and its own gain
        lines += ["", f"| against open_clip with the {other} malloc | per repeat | median (min–max) |", "|---|---|---|"]
        pairs = [(name, openclip_name(prec, other)) for name, (_, _, prec) in settings.items()]
        pairs += [(openclip_name(prec, other), openclip_name(prec, mallocs[0])) for prec in precisions]
        for name, reference in pairs:
            per_repeat = ratios(name, reference)
            cells = ", ".join(f"{x:.3f}" for x in per_repeat)
            lines.append(f"| {name} ÷ {reference} | {cells} | {median_spread(per_repeat)} |")
    if len(precisions) > 1:
        lines += ["", "| bf16 ÷ fp32, same trainer | per repeat | median (min–max) |", "|---|---|---|"]
        precision_of = {name: setting[-1] for name, setting in (settings | openclip).items()}
        for name, prec in precision_of.items():
            trainer = name.removesuffix(" bf16")
            if prec == "bf16" and f"{trainer} fp32" in precision_of:
                per_repeat = ratios(name, f"{trainer} fp32")
                lines.append(
                    f"| {trainer} | {', '.join(f'{x:.3f}' for x in per_repeat)} | {median_spread(per_repeat)} |"
                )
    lines.append(
        "\nCaptions: neuclip_ds's synthetic set has 10 tokens (bos + 8 + eos), open_clip's synthetic set "
        '"Dummy caption" 4; both are padded to 77 in the data. --text-padding longest runs the text tower on the '
        "batch's longest caption only; max_length runs all 77 positions, as open_clip does, and is what captions "
        "of about 77 tokens get. neuclip_ds runs with its default --host-malloc tuned (glibc malloc keeps freed "
        "memory for the next step; docs/performance.md#host-memory-allocator); open_clip with glibc's defaults "
        "(released) and, where listed, with the same settings given through the environment (tuned malloc)."
    )
    suffix = "".join(f"_{p}" for p in precisions if p != "fp32")
    out = args.out or ROOT / "benchmarks" / "results" / f"vs_openclip{suffix}.md"
    report("\n".join(lines), out, write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
