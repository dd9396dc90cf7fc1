"""Entry point `neuclip-train` (also `python -m neuclip_ds.train`): parse -> validate -> build -> loop -> save.

Configuration problems are found before any process group starts and printed as one line (exit code 2).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from .config import ConfigError, TrainConfig, parse_config
from .presets import get_preset


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_data(cfg: TrainConfig, info, accumulation: int, vocab: dict):
    """The training stream: per optimizer step, this rank's list of micro-batches."""
    from .synthetic import SyntheticPairs, SyntheticStream

    preset = get_preset(cfg.preset)
    data = SyntheticPairs(cfg.synthetic_samples, image_size=preset.image_size, context_length=preset.context_length,
                          vocab_size=vocab["vocab_size"], eos_token_id=vocab["eos_token_id"],
                          bos_token_id=vocab["bos_token_id"], pad_token_id=vocab["pad_token_id"], seed=cfg.seed)
    stream = SyntheticStream(data, global_batch_size=cfg.global_batch_size, rank=info.rank,
                             world_size=info.world_size, accumulation=accumulation, seed=cfg.seed)
    return stream, cfg.synthetic_samples, stream.steps_per_epoch


def build_model_for(cfg: TrainConfig, ds_config: dict, vocab: dict):
    import deepspeed

    from .model import build_model

    zero_init = cfg.zero_init == "on" or (cfg.zero_init == "auto" and cfg.zero_stage() == 3
                                          and cfg.preset in ("ViT-L-14", "ViT-H-14"))
    # deepspeed.zero.Init partitions each parameter as it is created, for presets that do not fit one rank
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_init):
        return build_model(cfg.preset, vocab_size=vocab["vocab_size"], eos_token_id=vocab["eos_token_id"],
                           bos_token_id=vocab["bos_token_id"], pad_token_id=vocab["pad_token_id"],
                           init_tau=cfg.init_tau, tau_min=cfg.tau_min, tau_max=cfg.tau_max,
                           with_bias=cfg.loss == "siglip", grad_checkpointing=cfg.grad_checkpointing,
                           hf_dir=cfg.pretrained_hf)


def run(cfg: TrainConfig) -> dict:
    from . import checkpoint
    from .engine import NeuCLIPEngine, build_ds_config, init_distributed
    from .metrics import MetricsLogger, plot_training

    info = init_distributed()
    out_dir = Path(cfg.output_dir)
    if info.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    seed_everything(cfg.seed)  # the same on every rank: identical initial weights
    accumulation = cfg.gradient_accumulation_steps()
    preset = get_preset(cfg.preset)
    vocab = {"vocab_size": preset.vocab_size, "eos_token_id": preset.vocab_size - 1,
             "bos_token_id": preset.vocab_size - 2, "pad_token_id": 0}
    stream, dataset_size, steps_per_epoch = build_data(cfg, info, accumulation, vocab)
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    model = build_model_for(cfg, build_ds_config(cfg, info.world_size), vocab)
    eng = NeuCLIPEngine(cfg, model, info, total_steps=total_steps, dataset_size=cfg.dataset_size or dataset_size)

    start_step = 0
    resume = checkpoint.resolve_resume(cfg.resume, out_dir)
    if resume is not None:
        state = checkpoint.load(eng.engine, *resume)
        start_step = int(state["step"])
        stream.load_state_dict(state["data"])
        eng.estimator.load_state_dict(state["estimator_shared"] | (state["mine"].get("estimator") or {}))
        eng.skipped_steps = int(state.get("skipped_steps", 0))
        checkpoint.set_rng_state(state["mine"]["rng"])
    seed_everything(cfg.seed * 1000 + info.rank) if resume is None else None  # per-rank streams (augmentation)

    logger = MetricsLogger(out_dir, rank=info.rank, total_steps=total_steps, report_to=cfg.report_to,
                           config=cfg.to_dict(), wandb_project=cfg.wandb_project, wandb_offline=cfg.wandb_offline,
                           initial_step=start_step, resume=resume is not None)

    def save(step: int) -> Path:
        shared, mine = _split_estimator_state(eng)
        return checkpoint.save(eng.engine, out_dir, step=step, keep_last=cfg.keep_last, client_state={
            "step": step, "data": stream.state_dict(), "estimator_shared": shared,
            "skipped_steps": eng.skipped_steps, "config": cfg.to_dict()},
            per_rank_state={"rng": checkpoint.rng_state(), "estimator": mine})

    record = {}
    try:
        for step in range(start_step, total_steps):
            eng.timer.reset()
            t0 = time.perf_counter()
            with eng.timer("data"):
                micro_batches = stream.next_step()
            m = eng.train_step(micro_batches, step=step, epoch=stream.epoch)
            elapsed = time.perf_counter() - t0
            times = eng.timer.times
            record = {"step": step + 1, "epoch": stream.epoch, "loss": m["loss"], "tau": m["tau"],
                      "lr": eng.scheduler.get_last_lr()[0], "samples_per_s": cfg.global_batch_size / elapsed,
                      "step_time_s": elapsed, "npn_time_frac": times["npn"] / elapsed,
                      "skipped_steps": eng.skipped_steps, "bad_samples": int(getattr(stream, "bad_samples", 0)),
                      **{f"time_{k}": v for k, v in times.items()},
                      **{k: v for k, v in m.items() if k not in ("loss", "tau", "skipped")}}
            logger.log(record)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                save(step + 1)
        ckpt = save(total_steps)
    finally:
        logger.close()
    summary = {"final": record, "checkpoint": str(ckpt), "metrics": str(out_dir / "metrics.jsonl")}
    if info.rank == 0:
        summary["plot"] = str(plot_training(out_dir / "metrics.jsonl", out_dir / "plots" / "training.png"))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _split_estimator_state(eng) -> tuple[dict, dict]:
    """NPN state is identical on every rank (saved once); u-table shards differ per rank."""
    state = eng.estimator.state_dict()
    if "npn" in state:
        return state, {}
    return {}, state


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        cfg.validate()
    except ConfigError as e:
        print(f"neuclip-train: error: {e}", file=sys.stderr)
        return 2
    from .engine import TrainingAborted

    try:
        summary = run(cfg)
    except TrainingAborted as e:
        print(f"neuclip-train: aborted: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        final = summary["final"]
        print(f"done: step {final.get('step')} loss {final.get('loss')} tau {final.get('tau')}")
        print(f"metrics:    {summary['metrics']}\nplot:       {summary['plot']}\ncheckpoint: {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
