"""Entry point `neuclip-train` (also `python -m neuclip_ds.train`): parse -> validate -> build -> loop -> save.

Configuration problems are found before any process group starts and printed as one line, by the first rank of
each node (every rank exits with code 2). Rank 0 then prints a start-up banner, progress (a bar on a terminal, plain
lines in a log file: metrics.MetricsLogger) and a `done:` summary.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from . import distributed
from .checkpoint import seed_everything
from .config import ConfigError, TrainConfig, parse_config
from .host_malloc import tune_host_malloc
from .metrics import format_scalars
from .presets import Preset
from .rundir import RunFiles
from .stopping import FaultWatchdog, StopSignals, report_failure

if TYPE_CHECKING:  # imported where used: deepspeed and the data stack load only when a run needs them
    from .data.stream import StepStream
    from .data.tokenizer import TextTokenizer
    from .diagnostics import NormErrProbe
    from .engine import DistInfo, NeuCLIPEngine
    from .flops import Peak
    from .model import CLIPDualEncoder


def build_tokenizer_vocab(cfg: TrainConfig) -> tuple[TextTokenizer | None, dict[str, int]]:
    """The tokenizer (None for synthetic data) and the ids the text tower must know."""
    geometry = cfg.geometry()
    if cfg.tokenizer is None:
        return None, {
            "vocab_size": geometry.vocab_size,
            "eos_token_id": geometry.eos_token_id,
            "bos_token_id": geometry.bos_token_id,
            "pad_token_id": geometry.pad_token_id,
        }
    from .data.tokenizer import TextTokenizer

    tok = TextTokenizer(cfg.tokenizer, context_length=geometry.context_length)
    return tok, {
        "vocab_size": tok.vocab_size,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def build_data(
    cfg: TrainConfig, info: DistInfo, accumulation: int, vocab: dict, tokenizer: TextTokenizer | None
) -> tuple[StepStream, int | None, int]:
    """The training stream (per optimizer step, this rank's list of micro-batches), the data set size FastCLIP's u
    tables cover, and the steps per epoch."""
    geometry = cfg.geometry()
    micro = cfg.micro_batch(info.world_size)
    if cfg.train_data is not None:
        from .data.loader import make_train_loader
        from .data.stream import LoaderStream

        loader = make_train_loader(
            cfg.train_data,
            tokenizer=tokenizer,
            image_size=geometry.image_size,
            batch_size=micro,
            num_samples=cfg.train_num_samples,
            rank=info.rank,
            world_size=info.world_size,
            workers=cfg.workers,
            seed=cfg.seed,
            resampled=cfg.data_resampled,
            drop_last=True,
            dataset_size=cfg.dataset_size,
        )
        stream = LoaderStream(
            loader, accumulation=accumulation, max_bad_fraction=cfg.max_bad_fraction, device=info.device
        )
        return stream, cfg.dataset_size or cfg.train_num_samples, stream.steps_per_epoch
    from .synthetic import SyntheticPairs, SyntheticStream

    data = SyntheticPairs(
        cfg.synthetic_samples,
        image_size=geometry.image_size,
        context_length=geometry.context_length,
        vocab_size=vocab["vocab_size"],
        eos_token_id=vocab["eos_token_id"],
        bos_token_id=vocab["bos_token_id"],
        pad_token_id=vocab["pad_token_id"],
        seed=cfg.seed,
    )
    stream = SyntheticStream(
        data,
        global_batch_size=cfg.global_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        accumulation=accumulation,
        seed=cfg.seed,
    )
    return stream, cfg.dataset_size or cfg.synthetic_samples, stream.steps_per_epoch


def build_model_for(cfg: TrainConfig, ds_config: dict, vocab: dict) -> CLIPDualEncoder:
    import deepspeed

    from .model import build_model, reinitialize_partitioned

    zero_init = cfg.zero_init == "on" or (
        cfg.zero_init == "auto" and cfg.ds.zero_stage == 3 and cfg.preset in ("ViT-L-14", "ViT-H-14")
    )
    # deepspeed.zero.Init partitions each parameter as it is created, for presets that do not fit one rank
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_init):
        model = build_model(
            cfg.preset,
            vocab_size=vocab["vocab_size"],
            eos_token_id=vocab["eos_token_id"],
            bos_token_id=vocab["bos_token_id"],
            pad_token_id=vocab["pad_token_id"],
            init_tau=cfg.init_tau,
            tau_min=cfg.tau_min,
            tau_max=cfg.tau_max,
            tau_param=cfg.tau_param,
            with_bias=cfg.loss == "siglip",
            grad_checkpointing=cfg.grad_checkpointing,
            hf_dir=cfg.pretrained_hf,
        )
    if zero_init and cfg.pretrained_hf is None:
        reinitialize_partitioned(model)
    return model


def run(cfg: TrainConfig, info: DistInfo, resume_dir: Path | None, stop_signals: StopSignals) -> dict:
    """The run on this rank, from an initialized process group to its summary. A stop signal any rank received
    (`stop_signals`) ends it at the next step boundary with a checkpoint of that step, on every rank alike."""
    from . import checkpoint
    from .engine import NeuCLIPEngine, TooManySkippedSteps, build_ds_config
    from .flops import Peak, resolve_peak, step_flops, throughput_metrics
    from .metrics import MetricsLogger, peak_memory_gib, plot_training, read_metrics
    from .profiling import StepProfiler, StepRange

    host_malloc = tune_host_malloc(cfg.host_malloc, on_cpu=info.device.type == "cpu")  # before the model's memory
    out_dir = Path(cfg.output_dir)
    files = RunFiles(out_dir)
    if info.rank == 0:
        start_output_dir(cfg, out_dir)
    run_id = checkpoint.run_id_for(resume_dir)
    seed_everything(cfg.seed)  # the same on every rank: identical initial weights
    accumulation = cfg.ds.gradient_accumulation_steps
    tokenizer, vocab = build_tokenizer_vocab(cfg)
    stream, dataset_size, steps_per_epoch = build_data(cfg, info, accumulation, vocab, tokenizer)
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    save_every = cfg.save_every or cfg.save_frequency * steps_per_epoch  # OpenCLIP's frequencies count epochs
    eval_every = cfg.eval_every or cfg.zeroshot_frequency * steps_per_epoch
    saved = checkpoint.read_shared(resume_dir) if resume_dir is not None else None
    resized = saved is not None and saved["world_size"] != info.world_size
    load_dir = checkpoint.to_universal(resume_dir) if resized else resume_dir
    model = build_model_for(cfg, build_ds_config(cfg, info.world_size), vocab)
    eng = NeuCLIPEngine(cfg, model, info, total_steps=total_steps, dataset_size=dataset_size, load_universal=resized)

    state = checkpoint.TrainState(
        eng,
        stream,
        config=dict(cfg.to_dict(), zero_stage=cfg.ds.zero_stage),
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
    )
    start_step = 0
    if saved is None:
        seed_everything(cfg.seed * 1000 + info.rank)  # per-rank random streams from here on (augmentation)
    else:
        checkpoint.check_files_are_data(resume_dir, load_dir)  # a refused file stops every rank alike
        checkpoint.load_engine(eng.ds, load_dir)
        start_step = state.load_state_dict(saved, resume_dir)

    probe = build_norm_err_probe(cfg, info, stream, tokenizer) if cfg.norm_err_every else None
    # the towers as built (a --pretrained-hf directory's may differ from the preset): their FLOPs per sample
    flops = Preset.from_configs(model.visual.config, model.text.config, name=cfg.preset)
    peak = Peak(None, "rank 0 reports")
    if info.rank == 0:  # the one that writes metrics.jsonl
        peak = resolve_peak(cfg.peak_tflops, cfg.precision, info.device)
        banner = startup_banner(
            cfg,
            info,
            model,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            start_step=start_step,
            flops=flops,
            peak=peak,
            host_malloc=host_malloc,
        )
        print(banner, file=sys.stderr, flush=True)

    logger = MetricsLogger(
        out_dir,
        rank=info.rank,
        total_steps=total_steps,
        report_to=cfg.report_to,
        config=cfg.to_dict(),
        wandb_project=cfg.wandb_project,
        wandb_offline=cfg.wandb_offline,
        initial_step=start_step,
        resume=saved is not None,
        log_every=cfg.log_every,
        run_id=run_id,
    )

    # the newest checkpoint with no skipped step since the one before it: an abort after skipped steps points at
    # it and rotation keeps it (a later checkpoint may hold weights already on their way to overflow)
    last_clean, skipped_at_last_save = resume_dir, eng.skipped_steps

    def save(step: int) -> Path | None:
        nonlocal last_clean, skipped_at_last_save
        refusal = eng.unsafe_to_save()
        if refusal is not None:
            logger.note(f"neuclip-train: step {step} not saved: {refusal}")
            return None
        tag_dir = checkpoint.save(
            eng.ds,
            out_dir,
            step=step,
            run_id=run_id,
            state=state.state_dict(),
            keep_last=cfg.keep_last,
            keep=last_clean,
        )
        if eng.skipped_steps == skipped_at_last_save:
            last_clean = tag_dir
        skipped_at_last_save = eng.skipped_steps
        return tag_dir

    steps_to_profile = StepRange.parse(cfg.profile_steps) if cfg.profile_steps else None
    profiler = StepProfiler(steps_to_profile, files.profile, info.rank, info.device)
    record, stopped_by = {}, None
    try:
        for step in range(start_step, total_steps):
            eng.timer.reset()
            profiler.begin(step + 1)
            t0 = time.perf_counter()
            with eng.timer("data"):
                micro_batches = stream.next_step()
            epoch = step // steps_per_epoch  # the same on every rank (FastCLIP's gamma schedule, E9)
            try:
                m = eng.train_step(micro_batches, step=step, epoch=epoch)
            except TooManySkippedSteps as e:
                raise TooManySkippedSteps(f"{e}; {where_to_restart(last_clean)}") from None
            bad = stream.check_bad_samples()  # past --max-bad-fraction: TooManyBadSamplesError on every rank alike
            elapsed = time.perf_counter() - t0
            profiler.end(step + 1)
            times = eng.timer.times
            record = {
                "step": step + 1,
                "epoch": epoch,
                "loss": m["loss"],
                "tau": m["tau"],
                "lr": eng.scheduler.get_last_lr()[0],
                "samples_per_s": cfg.global_batch_size / elapsed,
                "step_time_s": elapsed,
                # model FLOPs of this rank's samples (at the text positions they ran) / step time; mfu: / peak
                **throughput_metrics(step_flops(flops, micro_batches, cfg.text_padding), elapsed, peak),
                "npn_time_frac": times["npn"] / elapsed,
                "peak_mem_gib": peak_memory_gib(info.device),  # since the process started: the run's peak so far
                "skipped_steps": eng.skipped_steps,
                "optimizer_steps": eng.ds.global_steps,
                "bad_samples": bad,
                **{f"time_{k}": v for k, v in times.items()},
                **{k: v for k, v in m.items() if k not in ("loss", "tau", "skipped")},
            }
            if probe is not None and ((step + 1) % cfg.norm_err_every == 0 or step + 1 == total_steps):
                record.update(measure_norm_err(probe, eng, cfg, info))
            if cfg.val_data and eval_every and (step + 1) % eval_every == 0 and step + 1 < total_steps:
                record.update(periodic_evaluation(eng, cfg, tokenizer, info))
            logger.log(record)
            stopped_by = stop_signals.agreed(info.device)
            if stopped_by is not None:
                ckpt = save(step + 1)
                break
            if save_every and (step + 1) % save_every == 0 and step + 1 < total_steps:
                save(step + 1)
        else:  # the last step, not a stop signal
            if start_step < total_steps:
                ckpt = save(total_steps)
            else:  # resumed a finished run: nothing to train, report it as it is
                ckpt = resume_dir
                if info.rank == 0:
                    print(f"neuclip-train: {ckpt} is already at step {total_steps}; nothing to train", file=sys.stderr)
        evaluation = {}
        if cfg.val_data is not None and stopped_by is None:  # a preempted run keeps its grace period for the save
            evaluation = final_evaluation(eng, cfg, tokenizer, info, files.eval_results)
            if evaluation:  # rank 0
                logger.log_evaluation(evaluation["eval"], step=record.get("step", total_steps))
    finally:
        profiler.close()
        logger.close()
    if not record and info.rank == 0 and files.metrics.exists():
        rows = read_metrics(files.metrics)
        record = rows[-1] if rows else {}
    summary = {
        "final": record,
        "checkpoint": str(ckpt) if ckpt else None,
        "metrics": str(files.metrics),
        "stopped_by": stopped_by,
    }
    summary.update(evaluation)
    if hasattr(eng.estimator, "npn"):  # E8: the replicas must be identical; say so, and fail loudly if not
        summary["npn_checksums"] = distributed.gather_objects(eng.estimator.npn.checksum())
        if len(set(summary["npn_checksums"])) != 1:
            raise RuntimeError(f"NPN replicas diverged across ranks: {summary['npn_checksums']}")
    if info.rank == 0:
        final_eval = (record.get("step", total_steps), evaluation["eval"]) if evaluation else None
        summary["plot"] = str(plot_training(files.metrics, files.plot, final_eval))
        files.summary.write_text(json.dumps(summary, indent=2))
    return summary


def startup_banner(
    cfg: TrainConfig,
    info: DistInfo,
    model: CLIPDualEncoder,
    *,
    steps_per_epoch: int,
    total_steps: int,
    start_step: int,
    flops: Preset,
    peak: Peak | None = None,
    host_malloc: str | None = None,
) -> str:
    """What the run is about to do, in aligned lines, printed once by rank 0 before its first step: the sizes and
    settings a cluster user checks before waiting for a queue's worth of steps; the FLOPs of a sample (`flops`: the
    towers as built), the peak that mfu in metrics.jsonl divides by (`peak`: none given, no line) and what the host
    allocator does (`host_malloc`, from host_malloc.tune_host_malloc)."""
    from .config import format_bytes, model_state_bytes, npn_state_bytes
    from .flops import describe_npn_share

    def count(module: torch.nn.Module) -> int:  # ZeRO-3 (zero.Init) leaves each rank a shard: ds_numel is the whole
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())

    vision, text, total = count(model.visual), count(model.text), count(model)
    accumulation = cfg.ds.gradient_accumulation_steps
    micro = cfg.micro_batch(info.world_size)
    memory = f"{format_bytes(model_state_bytes(total, cfg.precision, cfg.ds.zero_stage, info.world_size))} model states"
    if cfg.loss == "neuclip" and cfg.npn_variant == "tailored":
        memory += f" + {format_bytes(npn_state_bytes(cfg.npn_prototypes, cfg.embed_dim()))} NPN"
    samples = cfg.train_num_samples if cfg.train_data is not None else cfg.synthetic_samples
    resumed = f", resuming after step {start_step}" if start_step else ""
    rows = [
        ("model", f"{cfg.pretrained_hf or cfg.preset}, loss {cfg.loss}"),
        ("parameters", f"vision {vision:,}  text {text:,}  total {total:,}"),
        ("ranks", f"{info.world_size}"),
        ("micro-batch", f"{micro} per rank"),
        ("accumulation", f"{accumulation}"),
        ("global batch", f"{cfg.global_batch_size}"),
        ("ZeRO stage", f"{cfg.ds.zero_stage}"),
        ("precision", cfg.precision),
        ("memory/rank", f"~{memory} (estimate; activations come on top)"),
        ("FLOPs/sample", format_flops(flops, cfg.text_padding)),
        ("epoch", f"{samples:,} samples, {steps_per_epoch} steps"),
        ("steps", f"{total_steps}{resumed}"),
        ("output dir", str(cfg.output_dir)),
    ]
    if host_malloc is not None:
        rows.insert([label for label, _ in rows].index("precision") + 1, ("host malloc", host_malloc))
    if peak is not None:
        rows.insert([label for label, _ in rows].index("FLOPs/sample") + 1, ("peak/rank", peak.describe()))
    if cfg.loss == "neuclip":
        npn = describe_npn_share(
            flops,
            per_rank_batch=cfg.global_batch_size // info.world_size,
            world_size=info.world_size,
            prototypes=cfg.npn_prototypes,
            inner_steps=cfg.npn_inner_steps,
            parallel=cfg.npn_parallel,
        )
        rows.insert([label for label, _ in rows].index("FLOPs/sample") + 1, ("NPN", npn))
    width = max(len(label) for label, _ in rows) + 2
    # no "neuclip-train:" prefix: that marks the one-line errors and notices (tests/test_fault_tolerance.py counts them)
    return "neuclip-train run\n" + "\n".join(f"  {label:<{width}}{value}" for label, value in rows)


def format_flops(p: Preset, text_padding: str) -> str:
    """`44.1 GFLOP fwd+bwd (vision 26.22 + text 17.88 at 77 text positions, ...)`: Preset.flops_per_sample at the
    full context (a --text-padding longest run counts each micro-batch at its longest caption, flops.step_flops)."""
    vision = 3 * p.vision_flops() - p.patch_embedding_flops()
    text = 3 * p.text_flops()
    fewer = ", fewer with --text-padding longest" if text_padding == "longest" else ""
    return (
        f"{p.flops_per_sample() / 1e9:.4g} GFLOP fwd+bwd (vision {vision / 1e9:.4g} + text {text / 1e9:.4g} at "
        f"{p.context_length} text positions{fewer})"
    )


def where_to_restart(last_clean: Path | None) -> str:
    if last_clean is None:
        return "no checkpoint was saved before the first skipped step: start over with a lower --lr, or check the data"
    return (
        f"the last checkpoint saved before the first skipped step is {last_clean}: --resume {last_clean} with a "
        f"lower --lr, or check the data"
    )


def start_output_dir(cfg: TrainConfig, out_dir: Path) -> None:
    """Rank 0, before anything is written: --overwrite removes the previous run's files, then the run config."""
    from .rundir import remove_previous_run

    if cfg.overwrite:
        removed = remove_previous_run(out_dir)
        if removed:
            print(f"neuclip-train: --overwrite: removed {', '.join(removed)} from {out_dir}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    # --overwrite acts once: a config.yaml reused with --config must not carry it to another directory
    run_config = dict(cfg.to_dict(), overwrite=False)
    RunFiles(out_dir).config.write_text(yaml.safe_dump(run_config, sort_keys=False))


def build_norm_err_probe(
    cfg: TrainConfig, info: DistInfo, stream: StepStream, tokenizer: TextTokenizer | None
) -> NormErrProbe:
    """Fixed anchors (the first S training samples) and this rank's share of the training set."""

    from .diagnostics import NormErrProbe

    S = cfg.norm_err_anchors
    if cfg.train_data is None:  # synthetic: in memory
        data = stream.data
        anchors = data.batch(torch.arange(min(S, data.num_samples)))
        mine = torch.arange(info.rank, data.num_samples, info.world_size)
        return NormErrProbe(anchors, lambda: (data.batch(i) for i in mine.split(256)), eps=cfg.normalizer_eps)
    from .data.loader import make_eval_loader

    common = dict(tokenizer=tokenizer, image_size=cfg.geometry().image_size, dataset_size=cfg.dataset_size)
    anchors = next(iter(make_eval_loader(cfg.train_data, batch_size=S, **common)))
    share = make_eval_loader(cfg.train_data, batch_size=256, rank=info.rank, world_size=info.world_size, **common)
    return NormErrProbe(anchors, lambda: iter(share), eps=cfg.normalizer_eps)


def measure_norm_err(probe: NormErrProbe, eng: NeuCLIPEngine, cfg: TrainConfig, info: DistInfo) -> dict:
    """norm_err = the run's own estimator's error (NeuCLIP: NPN; FastCLIP: u; others: a mini-batch's log g_hat),
    plus norm_err_<method> for each estimate available (the mini-batch one always)."""

    tau = torch.tensor([eng.temperature.tau])  # what the next step's forward uses (read after the step)
    errors = probe.measure(
        eng.encode,
        device=info.device,
        tau=tau.to(info.device),
        npn=getattr(eng.estimator, "npn", None),
        fastclip_loss=eng.loss_fn if cfg.loss == "fastclip" else None,
        batch=eng.last_global_batch,
    )
    own = {"neuclip": "neuclip", "fastclip": "fastclip"}.get(cfg.loss, "mbcl")
    out = {f"norm_err_{k}": v for k, v in errors.items()}
    out["norm_err"] = errors.get(own)
    return out


def _evaluate_now(
    eng: NeuCLIPEngine, cfg: TrainConfig, tokenizer: TextTokenizer | None, info: DistInfo, *, progress: bool
) -> dict | None:
    """Zero-shot + retrieval on the held-out split; the results on rank 0, None elsewhere.

    ZeRO-3: the module's forward hooks all-gather parameters, so every rank must run the same forwards: all ranks
    evaluate the whole split in lockstep. ZeRO-1/2 hold full weights: rank 0 alone."""
    import torch.distributed as dist

    from .evaluate import evaluate

    results = None
    if cfg.ds.zero_stage == 3 or info.rank == 0:
        results = evaluate(
            eng.model,
            val_data=cfg.val_data,
            tokenizer=tokenizer,
            dataset_dir=cfg.dataset_dir,
            device=info.device,
            batch_size=256,
            progress=progress and info.rank == 0,
        )
    dist.barrier()
    return results if info.rank == 0 else None


def periodic_evaluation(eng: NeuCLIPEngine, cfg: TrainConfig, tokenizer: TextTokenizer | None, info: DistInfo) -> dict:
    """--eval-every: the evaluation's numbers as eval/... keys of the step's metrics line."""
    results = _evaluate_now(eng, cfg, tokenizer, info, progress=False) or {}
    return {f"eval/{k}": v for k, v in results.items() if k != "num_samples"}


def final_evaluation(
    eng: NeuCLIPEngine, cfg: TrainConfig, tokenizer: TextTokenizer | None, info: DistInfo, path: Path
) -> dict:
    from .evaluate import format_table, write_results

    # its progress bar on a terminal only: in a log file the redraws would be one long line
    results = _evaluate_now(eng, cfg, tokenizer, info, progress=sys.stderr.isatty())
    if results is None:
        return {}
    write_results(results, path)
    return {"eval": results, "eval_results": str(path), "eval_table": format_table(results)}


def shutdown_distributed() -> None:
    """Tear the process group down before interpreter exit: left to static destructors, gloo can abort the
    process ('terminate called without an active exception')."""
    import torch.distributed as dist

    if distributed.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError, check_compatible, read_shared, resolve_resume
    from .rundir import check_output_dir

    try:
        cfg = parse_config(argv).validate()
        # the checkpoint to resume from and the output directory are checked before anything starts or is written
        resume_dir = resolve_resume(cfg.resume, cfg.output_dir)
        if resume_dir is not None:
            check_compatible(read_shared(resume_dir)["config"], cfg.to_dict(), cfg.ds.zero_stage)
        check_output_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    except (ConfigError, CheckpointError) as e:
        # every rank finds the same problem in the same files, before a process group exists to elect one printer:
        # the first rank of each node prints it, so a node's log holds it once (each node's, in case they differ)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"neuclip-train: error: {e}", file=sys.stderr)
        return 2
    from .data.bad_samples import TooManyBadSamplesError
    from .engine import TrainingAborted, init_distributed

    stop_signals = StopSignals()  # from here on a SIGTERM is a request to save and stop, honoured at step 1 at least
    try:
        info = init_distributed()
        watchdog = FaultWatchdog()
        summary = run(cfg, info, resume_dir, stop_signals)
    except BaseException as e:  # no barrier, no teardown: the other ranks may be waiting for this one (stopping.py)
        return report_failure(e, debug=cfg.debug, expected=(TrainingAborted, CheckpointError, TooManyBadSamplesError))
    watchdog.stop()
    shutdown_distributed()
    if info.rank == 0:
        final = summary["final"]
        print(f"done: step {final.get('step')} {format_scalars(final)}".rstrip())
        if "eval_table" in summary:
            print(summary["eval_table"])
        print(
            f"metrics:    {summary['metrics']}\nplot:       {summary['plot']}\n"
            f"checkpoint: {summary['checkpoint'] or 'not saved at the end (see above)'}"
        )
        if "eval_results" in summary:
            print(f"evaluation: {summary['eval_results']}")
        if summary["stopped_by"]:
            saved = "with a checkpoint" if summary["checkpoint"] else "without a checkpoint (see above)"
            print(
                f"neuclip-train: stopped by {summary['stopped_by']} at step {final.get('step')} {saved}; "
                f"--resume auto continues the run",
                file=sys.stderr,
            )
    return 0


def cli() -> None:
    """The console script and `python -m neuclip_ds.train`: main(), then leave without C++ static destructors.

    After a run that finished, saved and closed everything of ours, gloo/DeepSpeed threads still joinable at static
    destruction can abort the process ('terminate called without an active exception', exit 250) even after
    `shutdown_distributed`, rarely and at random, turning a finished run into a failed one. os._exit skips that
    phase."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
