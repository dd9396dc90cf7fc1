"""The one-GPU check (issue 16): throughput, MFU and peak memory of neuclip_ds on one GPU in at most 8 minutes.

    .venv-openclip/bin/python benchmarks/gpu_check.py               # on an H100 / H200 (open_clip row included)
    .venv/bin/python benchmarks/gpu_check.py                        # the same without the open_clip row
    .venv/bin/python benchmarks/gpu_check.py --dry-run              # every code path on CPU, tiny preset, no file

Runs, each a 1-rank `neuclip-train` on synthetic data (`--synthetic-samples`), bf16, `--text-padding max_length`
(all 77 text positions, as open_clip runs them and as the scale plan measured), `--peak-tflops` for MFU:

- ViT-B-16, NeuCLIP, per-GPU batch 256, under ZeRO-2 and ZeRO-3, each with and without `--grad-checkpointing`;
- NeuCLIP ÷ MBCL step time on ViT-B-16 ZeRO-2, `--repeats` interleaved repeats (A B, B A, ...); the NeuCLIP
  runs of this pair are the table's ZeRO-2 row;
- ViT-L-14, ZeRO-3 with `--zero-init on`, batch 256, checkpointing: peak memory against benchmarks/scale_plan.py's
  prediction for one GPU (its functions: DeepSpeed's model-state estimate, the towers' activation peak measured
  on CPU at batch 1 and 2, the loss / NPN peak);
- open_clip_train `--precision amp_bf16` on ViT-B-16 at the same batch, when `open_clip_train` imports here.

Batch 256 per GPU: the per-GPU batch of the paper's ViT-B-16 runs (8 x 256) and of configs/vit-l-14-8xh100.yaml;
the scale plan puts ViT-B-16 without checkpointing at up to 964 per GPU and ViT-L-14 with it at 2936, so every run
fits 80 GB with room left, and 256 x 197 image tokens keeps an H100 busy. The first `--warmup` steps of each run
are dropped (CUDA kernels picked, allocator warmed). Before any run the script prints its time estimate (model
FLOPs at `--mfu-guess` of the peak, plus `--startup-s` per run for start-up and the final checkpoint, plus the
checkpoint's bytes at `--disk-gbps`) and stops if it exceeds `--max-minutes`.

`--dry-run`: the same code paths on CPU, the tiny preset in place of ViT-B-16 and ViT-L-14 (open_clip: ViT-B-32,
batch 4), 3 steps, one repeat, the tiny ZeRO-3 + ckpt row skipped (the zero-init row runs the same path); prints
the table (CPU numbers, meaningless as GPU figures) and writes nothing.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import ROOT, interleaved, markdown_table, median_spread, report, synthetic_run, train

from neuclip_ds.config import model_state_bytes
from neuclip_ds.presets import get_preset

OUT = ROOT / "benchmarks" / "results" / "gpu_check.md"
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 (NVIDIA's datasheet: 1979 with 2:4 sparsity)
GiB = 2**30


@dataclass(frozen=True)
class Run:
    """One neuclip-train (or open_clip) run of the check."""

    name: str
    preset: str
    loss: str = "neuclip"
    ds_config: str = "zero2"
    ckpt: bool = False
    zero_init: str = "auto"
    trainer: str = "neuclip_ds"  # or "open_clip"

    @property
    def stage(self) -> int:
        return int(self.ds_config.removeprefix("zero"))


@dataclass(frozen=True)
class Plan:
    b16: str  # the preset of the ViT-B-16 rows (tiny in a dry run)
    l14: str
    openclip_model: str
    batch: int
    openclip_batch: int
    steps: int
    warmup: int
    repeats: int
    threads: int
    gpu: bool
    precision: str = "bf16"


def runs_of(plan: Plan) -> tuple[list[Run], dict[str, Run], Run, Run]:
    """The B-16 matrix (ZeRO-2 no-checkpointing comes from the ratio pair), the ratio pair, the L-14 run and the
    open_clip run; and every run in the order they start."""
    matrix = [
        Run(f"NeuCLIP ZeRO-{st}{' + ckpt' if ck else ''}", plan.b16, ds_config=f"zero{st}", ckpt=ck)
        for st in (2, 3)
        for ck in (False, True)
    ]
    pair = {"neuclip": matrix[0], "mbcl": Run("MBCL ZeRO-2", plan.b16, loss="mbcl")}
    l14 = Run("NeuCLIP ZeRO-3 + ckpt, zero-init on", plan.l14, ds_config="zero3", ckpt=True, zero_init="on")
    openclip = Run("open_clip amp_bf16", plan.openclip_model, loss="infonce", trainer="open_clip")
    return matrix, pair, l14, openclip


def args_of(run: Run, plan: Plan, peak_tflops: float) -> list[str]:
    args = synthetic_run(run.preset, run.loss, batch=plan.batch, steps=plan.steps, ds_config=run.ds_config)
    args += ["--precision", plan.precision, "--text-padding", "max_length", "--peak-tflops", str(peak_tflops)]
    args += ["--zero-init", run.zero_init, *(["--grad-checkpointing"] if run.ckpt else [])]
    return args


# -------------------------------------------------------------------------------------------------------------
# the time estimate
# -------------------------------------------------------------------------------------------------------------
def run_seconds(run: Run, plan: Plan, *, peak_tflops: float, mfu: float, startup_s: float, disk_gbps: float) -> float:
    """Start-up + steps at `mfu` of the peak (checkpointing recomputes the forward: 4/3 of the FLOPs) + writing the
    final checkpoint (model states of one rank) at `disk_gbps`."""
    p = get_preset(run.preset)
    batch = plan.openclip_batch if run.trainer == "open_clip" else plan.batch
    flops = plan.steps * batch * p.flops_per_sample() * (4 / 3 if run.ckpt else 1)
    seconds = startup_s + flops / (mfu * peak_tflops * 1e12)
    if run.trainer == "neuclip_ds":
        seconds += model_state_bytes(_params(run.preset), plan.precision, run.stage, 1) / (disk_gbps * 1e9)
    return seconds


@functools.cache
def _params(preset: str) -> int:
    from scale_plan import count_params  # the model built on the meta device

    return count_params(preset)["total"]


def estimate(plan: Plan, openclip: bool, **kw: float) -> tuple[float, list[tuple[str, float]]]:
    """Seconds of the whole check on a GPU and the seconds of each run, in the order they start."""
    matrix, pair, l14, oc = runs_of(plan)
    order = [pair[name] for _ in range(plan.repeats) for name in pair] + matrix[1:] + [l14]
    order += [oc] if openclip else []
    parts = [(f"{r.name} ({r.preset})", run_seconds(r, plan, **kw)) for r in order]
    return kw["startup_s"] + sum(s for _, s in parts), parts  # + the scale plan's CPU measurement, about a run's


# -------------------------------------------------------------------------------------------------------------
# the scale plan's prediction
# -------------------------------------------------------------------------------------------------------------
def predicted_peak(preset: str, batch: int, prototypes: int) -> dict[str, float]:
    """benchmarks/scale_plan.py's peak memory of one rank of one GPU (bytes): ZeRO-3 model states (DeepSpeed's
    estimator), the towers' activation peak with checkpointing (measured on CPU in bf16 at batch 1 and 2, per
    sample = the slope) at `batch`, and the larger of the NeuCLIP loss and an NPN inner step at global batch
    `batch`. The plan's budget adds a fixed workspace and 10 % fragmentation on top; those are not predicted."""
    from scale_plan import count_params, measure_loss_factor, measure_npn_factor, measure_towers, model_states_bytes

    from neuclip_ds.model import build_model

    pc = count_params(preset)
    states = model_states_bytes(3, pc["total"], pc["largest"], 1, 1)
    torch.manual_seed(0)
    model = build_model(preset).to(torch.bfloat16)
    one, two = (measure_towers(model, preset, b, True)["peak"] for b in (1, 2))
    activations = one + (two - one) * (batch - 1)
    loss = 4 * max(measure_loss_factor() * batch * batch, measure_npn_factor() * batch * prototypes)
    return {"states": states, "activations": activations, "loss": loss, "total": states + activations + loss}


# -------------------------------------------------------------------------------------------------------------
# the runs
# -------------------------------------------------------------------------------------------------------------
def openclip_installed() -> bool:
    try:
        import open_clip_train  # noqa: F401
    except ImportError:
        return False
    return True


def ours(run: Run, plan: Plan, peak_tflops: float, out: Path) -> dict:
    """Samples/s (batch ÷ median step time), median MFU and the run's peak memory, past the warm-up steps."""
    rows = train(args_of(run, plan, peak_tflops), out, threads=plan.threads, gpu=plan.gpu, keep_checkpoints=False)
    if len(rows) < plan.steps:
        raise SystemExit(f"{run.name}: expected {plan.steps} metrics rows, got {len(rows)}")
    timed = rows[plan.warmup : plan.steps]
    step = statistics.median(r["step_time_s"] for r in timed)
    return {
        "step_s": step,
        "samples_per_s": plan.batch / step,
        "mfu": statistics.median(r["mfu"] for r in timed),
        "peak_gib": max(r["peak_mem_gib"] for r in rows),
    }


def theirs(run: Run, plan: Plan, peak_tflops: float, out: Path) -> dict:
    """open_clip's samples/s from its log, and MFU from the same model FLOPs (77 text positions) and peak."""
    from vs_openclip import theirs as openclip_steps

    batch = plan.openclip_batch
    steps = openclip_steps(run.preset, batch, plan.steps, plan.threads, out, "bf16", gpu=plan.gpu, workers=8)
    if len(steps) < plan.steps:
        raise SystemExit(f"{run.name}: expected {plan.steps} step timings in its log, got {len(steps)}")
    timed = steps[plan.warmup : plan.steps]
    step = statistics.median(s for s, _ in timed)
    flops = batch * get_preset(run.preset).flops_per_sample()
    return {
        "step_s": step,
        "samples_per_s": batch / step,
        "mfu": flops / step / 1e12 / peak_tflops,
        "data_s": statistics.median(d for _, d in timed),
    }


def safely(fn, run: Run, *args) -> dict:
    """One run's figures, or {'error': ...}: a run that fails (out of memory, say) leaves the other rows standing."""
    try:
        return fn(run, *args)
    except SystemExit as e:
        last = [line for line in str(e).splitlines() if line.strip()][-1:] or ["failed"]
        print(f"[gpu_check] {run.name} failed:\n{e}", file=sys.stderr, flush=True)
        return {"error": last[0][:200]}


# -------------------------------------------------------------------------------------------------------------
# the table
# -------------------------------------------------------------------------------------------------------------
def cells(result: dict) -> list[str]:
    if "skipped" in result:
        return ["skipped", "—", "—"]
    if "error" in result:
        return ["failed", "—", "—"]
    peak = f"{result['peak_gib']:.2f}" if "peak_gib" in result else "n/a"
    return [f"{result['samples_per_s']:.4g}", f"{100 * result['mfu']:.3g} %", peak]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, 3 steps; writes nothing")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_BF16_DENSE_TFLOPS,
        help="one GPU's peak in bf16, for MFU (default: H100 SXM dense bf16; the H200 has the same)",
    )
    parser.add_argument("--batch", type=int, default=256, help="per-GPU batch of every run")
    parser.add_argument("--steps", type=int, default=20, help="steps per run; the first --warmup are dropped")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the NeuCLIP / MBCL pair")
    parser.add_argument("--threads", type=int, default=4, help="torch CPU threads of each run")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="stop before any run past this estimate")
    parser.add_argument("--mfu-guess", type=float, default=0.4, help="MFU the estimate assumes")
    parser.add_argument("--startup-s", type=float, default=40.0, help="start-up and exit of one run, estimated")
    parser.add_argument("--disk-gbps", type=float, default=1.0, help="checkpoint write speed, GB/s, estimated")
    parser.add_argument("--npn-prototypes", type=int, default=4096, help="neuclip-train's default m")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit("gpu_check: --steps must exceed --warmup")

    gpu_plan = Plan("ViT-B-16", "ViT-L-14", "ViT-B-16", args.batch, args.batch, args.steps, args.warmup,
                    args.repeats, args.threads, gpu=True)  # fmt: skip
    openclip = openclip_installed()
    kw = {"peak_tflops": args.peak_tflops, "mfu": args.mfu_guess, "startup_s": args.startup_s}
    total, parts = estimate(gpu_plan, openclip, disk_gbps=args.disk_gbps, **kw)
    print(
        f"[gpu_check] estimate on a GPU of {args.peak_tflops:g} bf16 TFLOPS: {total / 60:.1f} min "
        f"({len(parts)} runs at {args.mfu_guess:.0%} MFU, {args.startup_s:g} s start-up each, checkpoints at "
        f"{args.disk_gbps:g} GB/s, and the scale plan's CPU measurement)",
        flush=True,
    )
    for name, seconds in parts:
        print(f"[gpu_check]   {name}: {seconds:.0f} s", flush=True)
    if total > 60 * args.max_minutes:
        raise SystemExit(
            f"gpu_check: the estimate ({total / 60:.1f} min) exceeds --max-minutes {args.max_minutes:g}: lower "
            f"--steps or --repeats, or raise --max-minutes"
        )
    if args.dry_run:
        plan = Plan("tiny", "tiny", "ViT-B-32", 32, 4, 3, 1, 1, 1, gpu=False)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device visible; use --dry-run to check the script on CPU")
        plan = gpu_plan

    t0 = time.time()
    print(f"[gpu_check] scale plan prediction for {plan.l14} at {plan.batch}", flush=True)
    predicted = predicted_peak(plan.l14, plan.batch, args.npn_prototypes)
    matrix, pair, l14, oc = runs_of(plan)
    # in a dry run the tiny ZeRO-3 + ckpt row would take the L-14 row's code path again (tiny, ZeRO-3, ckpt): its
    # start-up time is spared so that the dry run stays short on a small machine
    skipped = {matrix[3]} if args.dry_run else set()
    results: dict[Run, dict] = {run: {"skipped": "dry run: the zero-init row's code path"} for run in skipped}
    with tempfile.TemporaryDirectory() as tmp:
        count = iter(range(10**6))

        def out() -> Path:
            path = Path(tmp) / str(next(count))
            path.mkdir()
            return path

        def one(name: str, r: int) -> dict:
            return safely(ours, pair[name], plan, args.peak_tflops, out())

        per_repeat = interleaved(pair, plan.repeats, one)
        for run in [*matrix[1:], l14]:
            if run in skipped:
                continue
            print(f"[gpu_check] {run.name} ({run.preset})", flush=True)
            results[run] = safely(ours, run, plan, args.peak_tflops, out())
        if openclip:
            print(f"[gpu_check] {oc.name} ({oc.preset})", flush=True)
            results[oc] = safely(theirs, oc, plan, args.peak_tflops, out())

    def combined(reps: list[dict]) -> dict:
        if any("error" in r for r in reps):
            return next(r for r in reps if "error" in r)
        return {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in reps),
            "mfu": statistics.median(r["mfu"] for r in reps),
            "peak_gib": max(r["peak_gib"] for r in reps),
        }

    results[pair["neuclip"]] = combined(per_repeat["neuclip"])
    results[pair["mbcl"]] = combined(per_repeat["mbcl"])
    ok = not any("error" in r for reps in per_repeat.values() for r in reps)
    ratio = (
        median_spread([a["step_s"] / b["step_s"] for a, b in zip(per_repeat["neuclip"], per_repeat["mbcl"])])
        if ok
        else "—"
    )

    def gib(x: float) -> str:
        return f"{x / GiB:.2f}"

    rows = []
    for run in matrix:
        rows.append([run.name, run.preset, plan.batch, *cells(results[run]), results[run].get("skipped", "—")])
    rows.append([pair["mbcl"].name, plan.b16, plan.batch, *cells(results[pair["mbcl"]]),
                 f"NeuCLIP ÷ MBCL step time: {ratio} ({plan.repeats} interleaved repeats)"])  # fmt: skip
    r14 = results[l14]
    vs_plan = f"plan predicts {gib(predicted['total'])} GiB"
    if "error" not in r14:
        vs_plan += f"; measured ÷ predicted: {r14['peak_gib'] * GiB / predicted['total']:.2f}"
    rows.append([l14.name, plan.l14, plan.batch, *cells(r14), vs_plan])
    if openclip:
        theirs_r, ours_r = results[oc], results[matrix[0]]
        vs = "—"
        if "error" not in theirs_r and "error" not in ours_r and oc.preset == matrix[0].preset:
            vs = f"NeuCLIP ZeRO-2 ÷ open_clip samples/s: {ours_r['samples_per_s'] / theirs_r['samples_per_s']:.3f}"
        elif "error" not in theirs_r:
            vs = f"data wait {theirs_r['data_s']:.3f} s/step"
        rows.append([oc.name, oc.preset, plan.openclip_batch, *cells(theirs_r), vs])
    else:
        rows.append([oc.name, oc.preset, plan.openclip_batch, "not installed", "—", "—", "—"])

    memory = "torch.cuda.max_memory_allocated" if plan.gpu else "the process's peak RSS on CPU"
    device = torch.cuda.get_device_name() if plan.gpu else "CPU (dry run: tiny preset, numbers are no GPU figures)"
    lines = [
        f"# GPU check ({time.strftime('%Y-%m-%d')})",
        "",
        f"command: {Path(sys.executable).parent.parent.name}/bin/python benchmarks/gpu_check.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        f"device: {device}; torch {torch.__version__}; 1 rank; {plan.precision} (open_clip: amp_bf16); "
        f"--text-padding max_length; {plan.steps} steps per run, first {plan.warmup} dropped; "
        f"MFU against --peak-tflops {args.peak_tflops:g}; checked in {(time.time() - t0) / 60:.1f} min",
        "",
        *markdown_table(
            ["run", "preset", "batch/GPU", "samples/s", "MFU", "peak mem (GiB)", "vs"],
            rows,
        ),
        "",
        f"Peak memory: `peak_mem_gib` of metrics.jsonl ({memory}). "
        f"Scale plan for {plan.l14} at {plan.batch} on one GPU: ZeRO-3 model states {gib(predicted['states'])} GiB "
        f"+ activations with checkpointing {gib(predicted['activations'])} GiB + loss / NPN "
        f"{gib(predicted['loss'])} GiB (its budget adds 4 GiB workspace and 10 % fragmentation on top).",
    ]
    report("\n".join(lines), args.out, write=not args.dry_run)
    return 0 if ok and not any("error" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
