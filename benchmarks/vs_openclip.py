"""Throughput against OpenCLIP's trainer: neuclip_ds (ZeRO-1, 1 rank, fp32, MBCL) vs `open_clip_train.main`
(issue 8.2), same model (ViT-B-32), batch, precision, optimizer, clipping and synthetic data.

    make openclip-venv                                        # once: .venv-openclip (torch 2.14.1 + torchvision
                                                              # + open_clip_torch[training] + neuclip_ds)
    .venv-openclip/bin/python benchmarks/vs_openclip.py       # ViT-B-32, batch 32, 2 interleaved repeats
    .venv-openclip/bin/python benchmarks/vs_openclip.py --quick

Both trainers run in the same interpreter and torch (open_clip needs torchvision, which does not import beside the
core venv's torch wheel), alternately (ours, theirs, ours, theirs) so that drift of this shared machine hits both.
Per step we read each trainer's own log: neuclip_ds's metrics.jsonl (time_* phases), open_clip's "Data (t)" and
"Batch (t)" lines (--log-every-n-steps 1, so each line is one step). Reported: samples/s end to end and of the
compute alone (step time minus data wait; open_clip decodes and augments images in its loader, our synthetic set
is in memory), medians over steps after warm-up, and the ratio ours ÷ theirs (target ≥ 1.10). Ours runs twice:
with the default --text-padding longest (text tower on the batch's longest caption) and with max_length (all 77
positions, as open_clip), so the table shows what the padding trim buys and what is left without it.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

from _common import ROOT, report, step_time, synthetic_run, train

from neuclip_ds.launch import cpu_env, run_command

OPENCLIP_LINE = re.compile(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+),")


def ours(
    model: str, batch: int, steps: int, threads: int, out: Path, *, text_padding: str = "longest"
) -> list[tuple[float, float]]:
    """(step seconds, data seconds) of each neuclip_ds step."""
    args = [*synthetic_run(model, "mbcl", batch=batch, steps=steps), *f"--wd 0.2 --text-padding {text_padding}".split()]
    rows = train(args, out, threads=threads)
    return [(step_time(r), r["time_data"]) for r in rows]


def ours_full_length(model: str, batch: int, steps: int, threads: int, out: Path) -> list[tuple[float, float]]:
    """neuclip_ds with the text tower on all 77 positions, as open_clip runs it (what captions near 77 tokens get)."""
    return ours(model, batch, steps, threads, out, text_padding="max_length")


def theirs(model: str, batch: int, steps: int, threads: int, out: Path) -> list[tuple[float, float]]:
    """(step seconds, data seconds) of each open_clip step, from its log."""
    run = (
        f"--model {model} --dataset-type synthetic --train-num-samples {batch * steps} --batch-size {batch} --epochs 1"
        " --precision fp32 --workers 1 --lr 1e-4 --warmup 1 --wd 0.2 --grad-clip-norm 1.0 --log-every-n-steps 1"
        " --name run --save-frequency 0 --zeroshot-frequency 0 --val-frequency 0 --seed 0"
    ).split()
    cmd = [sys.executable, "-m", "open_clip_train.main", *run, "--logs", str(out)]
    proc = run_command(cmd, cwd=out, env=cpu_env(threads, hide_cuda=True), timeout=None, check=False)
    log = out / "run" / "out.log"
    text = log.read_text() if log.is_file() else proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"open_clip failed:\n{text[-3000:]}")
    return [(float(b), float(d)) for d, b in OPENCLIP_LINE.findall(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, fewer steps, one repeat")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vs_openclip.md"))
    args = parser.parse_args(argv)
    try:
        import open_clip_train  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            "vs_openclip: open_clip_train is not installed in this interpreter; run `make "
            "openclip-venv` and use .venv-openclip/bin/python"
        ) from e
    import torch

    batch, steps, repeats, warm = (16, 6, 1, 2) if args.quick else (args.batch, 10, 2, 3)
    trainers = {"neuclip_ds": ours, "neuclip_ds --text-padding max_length": ours_full_length, "open_clip": theirs}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in trainers}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for i, (name, fn) in enumerate(trainers.items()):
                print(f"[vs_openclip] {name} repeat {r}", flush=True)
                out = Path(tmp) / f"trainer{i}_{r}"
                out.mkdir()
                rows = fn(args.model, batch, steps, args.threads, out)
                if len(rows) < steps:
                    raise SystemExit(f"{name}: expected {steps} step timings, got {len(rows)}")
                times[name] += rows[warm:steps]

    def rate(rows, compute_only):
        return batch / statistics.median([s - d if compute_only else s for s, d in rows])

    lines = [
        f"command: {Path(sys.executable).parent.parent.name}/bin/python benchmarks/vs_openclip.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        f"{args.model}, batch {batch}, fp32, 1 process, {args.threads} threads, torch {torch.__version__}, "
        f"{steps} steps per run (first {warm} dropped), {repeats} interleaved repeat(s)",
        "",
        "| trainer | samples/s end to end | samples/s compute only | median data wait (s) |",
        "|---|---|---|---|",
    ]
    for name, rows in times.items():
        lines.append(
            f"| {name} | {rate(rows, False):.2f} | {rate(rows, True):.2f} | "
            f"{statistics.median(d for _, d in rows):.3f} |"
        )
    lines += ["", "| ratio ÷ open_clip | end to end | compute only | target ≥ 1.10 (end to end) |", "|---|---|---|---|"]
    for name in (n for n in trainers if n != "open_clip"):
        e2e, compute = (rate(times[name], c) / rate(times["open_clip"], c) for c in (False, True))
        lines.append(f"| {name} | **{e2e:.3f}** | {compute:.3f} | {'met' if e2e >= 1.10 else 'not met'} |")
    lines.append(
        "\nCaptions: neuclip_ds's synthetic set has 10 tokens (bos + 8 + eos), open_clip's synthetic set "
        '"Dummy caption" 4; both are padded to 77 in the data. The default --text-padding longest runs '
        "the text tower on the batch's longest caption only (exact); max_length runs all 77 positions, as "
        "open_clip does, and is what captions of about 77 tokens get."
    )
    report("\n".join(lines), args.out, write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
