"""Throughput against OpenCLIP's trainer: neuclip_ds (1 rank, MBCL) vs `open_clip_train.main`, same model
(ViT-B-32), batch, precision, optimizer, clipping and synthetic data (issues 8.2 and 16).

    make openclip-venv                                        # once: .venv-openclip (torch + torchvision
                                                              # + open_clip_torch[training] + neuclip_ds)
    .venv-openclip/bin/python benchmarks/vs_openclip.py                    # fp32, 5 repeats
    .venv-openclip/bin/python benchmarks/vs_openclip.py --precision bf16   # ours bf16 vs open_clip amp_bf16
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
the batch's longest caption, exact) and with max_length (all 77 positions, as open_clip runs them).
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

from neuclip_ds.launch import run_command

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
    return [(r["step_time_s"], r["time_data"]) for r in train(args, out, threads=threads)]


def theirs(
    model: str, batch: int, steps: int, threads: int, out: Path, precision: str, *, gpu: bool = False, workers: int = 1
) -> list[tuple[float, float]]:
    """(step seconds, data seconds) of each open_clip step, from its log; on CPU with no GPU in sight unless `gpu`
    (open_clip then takes the GPU). `workers` data-loader workers decode its synthetic images."""
    run = (
        f"--model {model} --dataset-type synthetic --train-num-samples {batch * steps} --batch-size {batch} --epochs 1"
        f" --precision {OPENCLIP_PRECISION[precision]} --workers {workers} --lr 1e-4 --warmup 1 --wd 0.2"
        " --grad-clip-norm 1.0 --log-every-n-steps 1 --name run --save-frequency 0 --zeroshot-frequency 0"
        " --val-frequency 0 --seed 0"
    ).split()
    cmd = [sys.executable, str(PINNED), "open_clip_train.main", *run, "--logs", str(out)]
    proc = run_command(cmd, cwd=out, env=pinned_env(threads, gpu=gpu), timeout=None, check=False)
    log = out / "run" / "out.log"
    text = log.read_text() if log.is_file() else proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"open_clip failed:\n{text[-3000:]}\n{proc.stderr[-2000:]}")
    checked_threads(proc.stderr, threads, "open_clip")
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
    parser.add_argument("--precision", choices=sorted(OPENCLIP_PRECISION), default="fp32")
    parser.add_argument(
        "--ds-configs",
        default="zero0,zero1",
        help="ours runs under each of these shipped DeepSpeed configs (comma list), with both text paddings",
    )
    parser.add_argument("--out", default=None, help="default: benchmarks/results/vs_openclip[_bf16].md")
    args = parser.parse_args(argv)
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
    prec = args.precision
    settings = {  # trainer name -> (ds config, text padding)
        f"neuclip_ds {ds} {padding}": (ds, padding)
        for ds in args.ds_configs.split(",")
        for padding in ("longest", "max_length")
    }
    trainers = {
        name: functools.partial(
            ours, args.model, batch, steps, args.threads, precision=prec, text_padding=padding, ds_config=ds
        )
        for name, (ds, padding) in settings.items()
    }
    trainers["open_clip"] = functools.partial(theirs, args.model, batch, steps, args.threads, precision=prec)
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

    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"command: {Path(sys.executable).parent.parent.name}/bin/python benchmarks/vs_openclip.py {cmd}".rstrip(),
        f"{args.model}, batch {batch}, {prec} (open_clip: {OPENCLIP_PRECISION[prec]}), 1 process, torch "
        f"{torch.__version__}, open_clip {open_clip.__version__}; {args.threads} intra-op and inter-op threads for "
        f"both trainers, checked at start and exit of every run; {steps} steps per run (first {warm} dropped), "
        f"{repeats} repeats interleaved A B C, C B A, ...",
        "",
        "| trainer | samples/s per repeat | median data wait (s) |",
        "|---|---|---|",
    ]
    for name, reps in times.items():
        per_repeat = ", ".join(f"{rate(rows):.2f}" for rows in reps)
        wait = statistics.median(d for rows in reps for _, d in rows)
        lines.append(f"| {name} | {per_repeat} | {wait:.3f} |")
    lines += [
        "",
        "| ours ÷ open_clip | per repeat | median (min–max) | target |",
        "|---|---|---|---|",
    ]
    for name in (n for n in trainers if n != "open_clip"):
        ratios = [rate(a) / rate(b) for a, b in zip(times[name], times["open_clip"], strict=True)]
        target = TARGETS.get((prec, settings[name][1]))
        met = target is not None and statistics.median(ratios) >= target
        verdict = "—" if target is None else f"≥ {target}: {'met' if met else 'not met'}"
        lines.append(f"| {name} | {', '.join(f'{x:.3f}' for x in ratios)} | **{median_spread(ratios)}** | {verdict} |")
    lines.append(
        "\nCaptions: neuclip_ds's synthetic set has 10 tokens (bos + 8 + eos), open_clip's synthetic set "
        '"Dummy caption" 4; both are padded to 77 in the data. --text-padding longest runs the text tower on the '
        "batch's longest caption only; max_length runs all 77 positions, as open_clip does, and is what captions "
        "of about 77 tokens get."
    )
    suffix = "" if prec == "fp32" else f"_{prec}"
    out = args.out or ROOT / "benchmarks" / "results" / f"vs_openclip{suffix}.md"
    report("\n".join(lines), out, write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
