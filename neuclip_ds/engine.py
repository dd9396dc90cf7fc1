"""The training step (E7, E8): DeepSpeed ZeRO encoders + a replicated NPN, in the engine's accumulation loop.

One optimizer step, as `NeuCLIPEngine.train_step` reads:
  1. encode this rank's A micro-batches (A = gradient_accumulation_steps). With A = 1 the forward keeps its graph;
     with A > 1 it runs without graph and the features are cached (open_clip's accum_freq idea, E8);
  2. gather the features of the global batch and log g_hat of every anchor against it (`StepBatch`, detached);
  3. the alpha estimator on the global batch (`Estimator.prepare`): NeuCLIP fits the NPN for T_u AdaGrad steps then
     predicts alpha (E7.2, E5; restart every T_r steps, E7.4); FastCLIP updates its u tables (E9); MBCL/SigLIP have
     none. It returns the loss's arguments for this rank's anchors (alpha, detached in the loss: E6);
  4. per micro-batch: its features with graph (A > 1: re-encoded and spliced into the cached global batch), the loss
     of the local anchors against the global batch, DeepSpeed's `backward` and `step` (`NeuCLIPEngine.ds`).
The gradients of the A micro-batches are summed (`scale_wrt_gas=False`: each chunk's loss is already the loss of
the whole step), and tau / the SigLIP bias take their gradient from chunk 0 only, so 2 x b accumulation gives the
gradients of 1 x 2b. A non-finite step is skipped on every rank with no parameter, NPN or u-table update; so is a
step whose update DeepSpeed skipped (an fp16 loss-scale overflow; under ZeRO also non-finite gradients): the
estimator's update is undone after the fact.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import deepspeed
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from . import distributed
from .config import TrainConfig, uses_cuda
from .data.tokenizer import trim_text_padding
from .extensions import prepare_cpu_ops, release_shm_buffers
from .losses import (
    LOSSES,
    ContrastiveLoss,
    FastCLIPLoss,
    Features,
    NeuCLIPLoss,
    all_gather_no_grad,
    batch_log_normalizers,
    gather_features,
    log_eps_plus,
)
from .model import CLIPDualEncoder, temperature_from_parameter
from .npn import NPN


class TrainingAborted(RuntimeError):
    """Raised on every rank when the run cannot go on (e.g. K non-finite steps in a row)."""


class TooManySkippedSteps(TrainingAborted):
    """--max-skipped-in-a-row non-finite steps in a row: the run diverged."""


# ---------------------------------------------------------------------------------------------------------------
# process group and DeepSpeed config
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed() -> DistInfo:
    """NCCL + CUDA when present, else gloo on CPU (DS_ACCELERATOR=cpu). Works with and without a launcher."""
    cuda = uses_cuda()
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"
        prepare_cpu_ops()  # per-venv build folder for the shm op, never wait on a dead build lock
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        if not cuda:
            release_shm_buffers()  # DeepSpeed never unlinks its 66 MB /dev/shm buffer per rank
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(distributed.rank(), distributed.world_size(), local_rank, device)


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict:
    """The user's JSON (`cfg.resolve()`d) with the batch sizes, precision and clipping this run decides."""
    ds = copy.deepcopy(cfg.ds.settings)  # DeepSpeed and callers edit what they get; cfg.ds stays as read
    accum = cfg.ds.gradient_accumulation_steps
    ds["train_batch_size"] = cfg.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch(world_size)
    ds["gradient_accumulation_steps"] = accum
    pure = cfg.precision == "pure_bf16"  # no fp32 copy at all: ZeRO's bf16 master weights, gradients and moments
    ds["bf16"] = {
        "enabled": cfg.precision in ("bf16", "pure_bf16"),
        **({"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True} if pure else {}),
    }
    ds["fp16"] = {
        "enabled": cfg.precision == "fp16",
        **({"initial_scale_power": 12} if cfg.precision == "fp16" else {}),
    }
    ds["gradient_clipping"] = cfg.ds.gradient_clipping  # resolved: --grad-clip over the JSON's
    ds.setdefault("steps_per_print", 10**9)
    return ds


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (E6) with three groups, as OpenCLIP/FastCLIP: weights with weight decay; gains, biases and the SigLIP
    bias without; the temperature alone, without weight decay, at --lr-tau (its schedule: `TemperatureLR`)."""
    tau = model.temperature_parameter
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and p is not tau:
            shape = getattr(p, "ds_shape", p.shape)  # under zero.Init p itself is an empty partition
            (decay if len(shape) >= 2 else no_decay).append(p)
    groups = [{"params": ps, "weight_decay": wd, "lr": cfg.lr} for ps, wd in ((decay, cfg.wd), (no_decay, 0.0)) if ps]
    groups.append({"params": [tau], "weight_decay": 0.0, "lr": cfg.tau_lr(), "is_temperature": True})
    # fused: one vectorized kernel over ZeRO's flat fp32 partition, on CPU as on CUDA. Measured on 151 M fp32
    # parameters (ViT-B-32) on 2 CPU cores: 0.06 s per step against 0.45 s for the default per-tensor loop,
    # which would be ~10 % of a ViT-B-32 step on CPU (benchmarks/vs_openclip.py)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=True)


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class TemperatureLR:
    """The LR factor of the temperature's group (a LambdaLR entry; its attributes are saved with the scheduler).

    cosine:      the encoders' warmup + cosine schedule.
    step_thresh: FastCLIP-v3's: linear warmup, then constant, times `ratio` (1/3) while tau <= `threshold` (0.03),
                 so that tau moves more slowly once it is small. `tau` is the current temperature, set by the
                 engine after every step (the factor of step t uses the tau left by step t - 1)."""

    def __init__(
        self, schedule: str, warmup: int, total: int, tau: float, threshold: float = 0.03, ratio: float = 1 / 3
    ) -> None:
        self.schedule, self.warmup, self.total = schedule, warmup, total
        self.tau, self.threshold, self.ratio = float(tau), threshold, ratio

    def follow(self, schedule: str, warmup: int, total: int) -> None:
        """Take this run's schedule and lengths after a checkpoint load: the scheduler's state restores every
        attribute as saved, while the encoders' factor (a closure, which the state cannot hold) follows this run's
        --steps and --warmup; both must follow the same ones. A resume with unchanged options changes nothing."""
        self.schedule, self.warmup, self.total = schedule, warmup, total

    def __call__(self, step: int) -> float:
        if self.schedule == "cosine":
            return cosine_with_warmup(self.warmup, self.total)(step)
        if step < self.warmup:
            return (step + 1) / self.warmup
        return self.ratio if self.tau <= self.threshold else 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.lr_scheduler.LambdaLR, TemperatureLR]:
    encoders = cosine_with_warmup(cfg.warmup, total_steps)
    temperature = TemperatureLR(cfg.lr_tau_schedule, cfg.warmup, total_steps, cfg.init_tau)
    factors = [temperature if g.get("is_temperature") else encoders for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors), temperature


class TemperatureKeeper:
    """Keeps the stored temperature parameter inside [tau_min, tau_max] after every optimizer step.

    What OpenCLIP and FastCLIP do (`logit_scale.clamp_` after `optimizer.step()`), under DeepSpeed: the value is
    written into the fp32 master copy the optimizer updates (ZeRO-1/2/3, CPU offload included; a write to the
    module (`NeuCLIPEngine.model`) alone would be overwritten from the master by the next step) and into the
    module's working copy the next forward reads. The parameter itself is clamped, so its gradient stays alive
    and tau can come back from a bound as soon as the objective asks for it (a clamp inside forward would zero
    that gradient for good). Collective: every rank calls `after_step` (one all-reduce of one number; a write
    only when outside)."""

    def __init__(self, module: CLIPDualEncoder, *, rank: int, warn_after: int = 50) -> None:
        self.rank, self.warn_after = rank, warn_after
        self.param = module.temperature_parameter
        self.tau_param = module.tau_param
        # the bounds as fp32 values: what the master copy can hold exactly, so a clamped value reads back equal
        self.lo, self.hi = (float(torch.tensor(b, dtype=torch.float32)) for b in module.temperature_bounds())
        self.tau_min, self.tau_max = module.tau_min, module.tau_max
        self.steps_at_bound = 0
        self.value = self._read()

    @property
    def tau(self) -> float:
        return float(temperature_from_parameter(torch.tensor(self.value, dtype=torch.float64), self.tau_param))

    def _read(self) -> float:
        full = deepspeed.utils.safe_get_full_fp32_param(self.param)  # ZeRO-1/2/3 and bf16: the fp32 master
        if full is None:  # no master: the parameter is its own
            full = self.param.detach()
        return float(full.reshape(-1)[0])

    def _write(self, value: float) -> None:
        p = self.param
        if hasattr(p, "ds_id"):
            # ZeRO-3: each rank's fp32 partition is a slice of the parameter padded to world x partition size;
            # DeepSpeed's set_full_hp_param slices the unpadded value, which fails on ranks that hold only padding,
            # so only ranks whose whole partition lies inside the parameter write: for the 1-element tau (one
            # element per partition) that is rank 0, which holds the value; the other ranks hold padding.
            part = p.ds_tensor.numel()
            if (distributed.rank() + 1) * part <= p.ds_numel:
                deepspeed.utils.safe_set_full_fp32_param(
                    p, torch.full((p.ds_numel,), value, dtype=torch.float32, device=p.ds_tensor.device)
                )
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.fill_(value)  # the working copy, re-partitioned
        else:
            deepspeed.utils.safe_set_full_fp32_param(p, torch.full_like(p, value, dtype=torch.float32))
            p.data.fill_(value)  # ZeRO-0/1/2: the full working copy

    def after_step(self, step: int) -> float:
        """Clamp the stored parameter if the step left its range; warn once per episode at a bound. Returns tau."""
        value = self._read()
        clamped = min(max(value, self.lo), self.hi)
        if clamped != value:
            self._write(clamped)
        self.value = clamped
        at_bound = clamped in (self.lo, self.hi)
        self.steps_at_bound = self.steps_at_bound + 1 if at_bound else 0
        if self.steps_at_bound == self.warn_after + 1 and self.rank == 0:
            which, bound = ("lower", self.tau_min) if self.tau <= self.tau_min * (1 + 1e-6) else ("upper", self.tau_max)
            print(
                f"neuclip-train: warning: tau has sat at its {which} bound {bound:g} for {self.warn_after} steps "
                f"(step {step + 1}); the objective keeps pushing it there: widen --tau-min/--tau-max or lower "
                f"--lr-tau",
                file=sys.stderr,
            )
        return self.tau


# ---------------------------------------------------------------------------------------------------------------
# per-phase timing
# ---------------------------------------------------------------------------------------------------------------
class PhaseTimer:
    """Wall time per phase of a step; synchronizes CUDA at phase edges so GPU work is charged to its phase. Each
    phase is also a named range in a --profile-steps trace (record_function costs microseconds when no profiler
    runs)."""

    PHASES = ("data", "forward", "gather", "npn", "backward", "optimizer")

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.times = dict.fromkeys(self.PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(phase):
                yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.times[phase] += time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# the global batch of a step and the alpha estimators that run on it (E7.2, E9)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StepBatch:
    """The gathered global batch of one optimizer step (E8), detached: what an estimator sees.

    B = world size x A x b rows, rank r's A micro-batches at rows [r A b, (r+1) A b) (`rows` for this rank)."""

    img: torch.Tensor  # [B, d] normalized image features
    txt: torch.Tensor  # [B, d] normalized text features
    tau: torch.Tensor  # [1]
    log_g_img: torch.Tensor  # [B] log g_hat of each image anchor against the global batch (E1)
    log_g_txt: torch.Tensor  # [B] the same for the text anchors
    log_target_img: torch.Tensor  # [B] log(eps + g_hat): the minimizer of E5 (the NPN's target, E9's reference)
    log_target_txt: torch.Tensor
    index: torch.Tensor  # [B] dataset indices (FastCLIP's table rows, E9)
    rows: slice  # this rank's anchors
    step: int
    epoch: int


class Estimator(Protocol):
    """The auxiliary variable alpha of a loss, updated once per optimizer step on the global batch.

    `prepare(batch)` returns the keyword arguments of the loss for this rank's anchors (the same for each of its
    micro-batches: every micro-batch's loss covers all of this rank's anchors, E8) and its metrics (floats).
    `snapshot(batch)`/`restore` undo a `prepare(batch)` whose step is skipped; `state_dict`/`load_state_dict`
    checkpoint it."""

    def prepare(self, batch: StepBatch) -> tuple[dict[str, torch.Tensor], dict[str, float]]: ...

    def snapshot(self, batch: StepBatch) -> Any: ...

    def restore(self, snap: Any) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def alpha_arguments(
    alpha_img: torch.Tensor, alpha_txt: torch.Tensor, batch: StepBatch
) -> tuple[dict[str, torch.Tensor], float]:
    """E6's loss arguments from alpha over the global batch (this rank's rows), and alpha's mean distance to
    log(eps + g_hat) of the batch (the estimator's batch error metric)."""
    err = ((alpha_img - batch.log_target_img).abs().mean() + (alpha_txt - batch.log_target_txt).abs().mean()) / 2
    return {"alpha_img": alpha_img[batch.rows], "alpha_txt": alpha_txt[batch.rows]}, float(err)


class NoEstimator:
    """MBCL and SigLIP: no auxiliary variable."""

    def prepare(self, batch: StepBatch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return {}, {}

    def snapshot(self, batch: StepBatch) -> None:
        return None

    def restore(self, snap: None) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NPNEstimator:
    """NeuCLIP: T_u NPN steps on the global batch, then alpha = NPN(e1, e2, tau) detached (E7.2-3).

    --npn-parallel sharded (E8 option (b)): the inner steps and the prediction run on this rank's rows of the
    global batch (its own anchors), NPN gradients are all-reduced and the B alphas all-gathered, so the NPN's work
    per rank is O(b_local) instead of O(B) and the replicas stay identical (checksummed at the end)."""

    def __init__(self, npn: NPN, cfg: TrainConfig) -> None:
        self.npn, self.cfg = npn, cfg
        # the step of the last restart (None: none known, as in a checkpoint that predates it): a restart due at a
        # skipped step happens at the next step that is not skipped, not a whole restart period later
        self.last_restart: int | None = None

    def _restart_due(self, step: int) -> bool:
        every = self.cfg.npn_restart_every
        if self.last_restart is None:
            return step % every == 0
        return step // every > self.last_restart // every

    def _predict(self, batch: StepBatch, rows: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        if rows is None:
            return self.npn.predict(batch.img, batch.txt, batch.tau)
        return tuple(all_gather_no_grad(a) for a in self.npn.predict(batch.img[rows], batch.txt[rows], batch.tau))

    def prepare(self, batch: StepBatch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        cfg = self.cfg
        sharded = cfg.npn_parallel == "sharded" and distributed.is_distributed()
        rows = batch.rows if sharded else None
        if self._restart_due(batch.step):  # E7.4 (step 0 included: start from the data, not at random)
            self.last_restart = batch.step
            self.npn.restart(
                batch.img,
                batch.txt,
                seed=cfg.seed * 1_000_003 + batch.step,
                reset_optimizer=cfg.npn_restart_resets_adagrad,
            )
        if cfg.npn_update == "simultaneous":  # ablation: alpha from the NPN before this step's update
            alpha = self._predict(batch, rows)
        npn_loss = self.npn.fit(
            batch.img, batch.txt, batch.log_target_img, batch.log_target_txt, batch.tau, cfg.npn_inner_steps, rows=rows
        )
        if cfg.npn_update == "alternating":
            alpha = self._predict(batch, rows)
        loss_args, err = alpha_arguments(*alpha, batch)
        return loss_args, {"npn_loss": npn_loss, "npn_batch_err": err}

    def snapshot(self, batch: StepBatch) -> dict:
        # the NPN is small: a copy per step is cheap
        return {"npn": copy.deepcopy(self.npn.state_dict()), "last_restart": self.last_restart}

    def restore(self, snap: dict) -> None:
        self.npn.load_state_dict(snap["npn"])
        self.last_restart = snap["last_restart"]

    def state_dict(self) -> dict:
        return {"npn": self.npn.state_dict(), "last_restart": self.last_restart}

    def load_state_dict(self, state: dict) -> None:
        self.npn.load_state_dict(state["npn"])
        self.last_restart = state.get("last_restart")


class TableEstimator:
    """FastCLIP: u <- (1-gamma)u + gamma g_hat on the global batch, alpha = log(eps + u) (E9)."""

    def __init__(self, loss_fn: FastCLIPLoss) -> None:
        self.loss_fn = loss_fn

    def prepare(self, batch: StepBatch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        alpha = self.loss_fn.update_alpha(batch.index, batch.log_g_img, batch.log_g_txt, batch.epoch)
        loss_args, err = alpha_arguments(*alpha, batch)
        return loss_args, {"fastclip_gamma": self.loss_fn.gamma(batch.epoch), "u_batch_err": err}

    def snapshot(self, batch: StepBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The rows `prepare(batch)` writes, not the tables: O(B) per step, where a copy of this rank's share of the
        tables would be O(n / W) (1 GB at 10^9 samples on 8 ranks)."""
        return [t.snapshot_rows(batch.index) for t in (self.loss_fn.u_img, self.loss_fn.u_txt)]

    def restore(self, snap: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for t, (rows, values) in zip((self.loss_fn.u_img, self.loss_fn.u_txt), snap):
            t.restore_rows(rows, values)

    def state_dict(self) -> dict:
        return {"u_img": self.loss_fn.u_img.state_dict(), "u_txt": self.loss_fn.u_txt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loss_fn.u_img.load_state_dict(state["u_img"])
        self.loss_fn.u_txt.load_state_dict(state["u_txt"])

    def load_resharded(self, old_shards: list[dict]) -> None:
        """u-table shards written at another world size -> this rank's shard (index owner = index % W)."""
        for side in ("u_img", "u_txt"):
            getattr(self.loss_fn, side).load_from_shards([s[side] for s in old_shards])


# ---------------------------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------------------------
class NeuCLIPEngine:
    """One training run's step: the DeepSpeed engine (`ds`) around the CLIP model, the loss and its alpha estimator,
    the temperature's range and LR factor, per-phase timers and the count of skipped steps."""

    ds: deepspeed.DeepSpeedEngine  # forward, backward, step, save/load_checkpoint, global_steps

    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        info: DistInfo,
        *,
        total_steps: int,
        dataset_size: int | None = None,
        load_universal: bool = False,
    ) -> None:
        self.cfg, self.info = cfg, info
        ds_config = build_ds_config(cfg, info.world_size)
        if load_universal:  # resuming at another world size from a universal checkpoint
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        optimizer = build_optimizer(model, cfg)
        scheduler, self.temperature_lr = build_scheduler(optimizer, cfg, total_steps)
        self._tau_schedule = (cfg.lr_tau_schedule, cfg.warmup, total_steps)  # the schedule `follow`s on resume
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        if info.world_size == 1 and cfg.ds.zero_stage == 0:
            # one rank has nothing to average, but stage 0 would still flatten every gradient into buckets,
            # all-reduce them over the one rank and copy them back: ~3 passes over the gradients per step
            # (ZeRO stages reduce through their own optimizer and keep this path off)
            self.ds.enable_backward_allreduce = False
        self.temperature = TemperatureKeeper(model, rank=info.rank)
        self.temperature_lr.tau = self.temperature.tau  # --pretrained-hf: the model's own tau, not --init-tau
        self.accumulation = self.ds.gradient_accumulation_steps()
        self.micro_batch = self.ds.train_micro_batch_size_per_gpu()
        self.timer = PhaseTimer(info.device)
        self.skipped_steps = 0
        self.skipped_in_a_row = 0
        self.last_global_batch = None
        self.loss_fn, self.loss_call, self.estimator = self._build_loss(model, dataset_size)

    @property
    def model(self) -> torch.nn.Module:
        """The CLIP model DeepSpeed wraps (`ds.module`; under ZeRO-3 its parameters are this rank's partitions)."""
        return self.ds.module

    def _build_loss(
        self, model: torch.nn.Module, dataset_size: int | None
    ) -> tuple[ContrastiveLoss, Callable[..., torch.Tensor], Estimator]:
        """The loss, what each micro-batch's backward calls (`loss_call(feats, tau, **model outputs, **estimator
        arguments)`), and the estimator of its alpha."""
        cfg = self.cfg
        if cfg.loss == "neuclip":
            dim = model.visual.config.projection_dim
            npn = NPN(
                dim,
                num_prototypes=cfg.npn_prototypes,
                eps=cfg.normalizer_eps,
                lr=cfg.npn_lr,
                variant=cfg.npn_variant,
                seed=cfg.seed,
                device=self.info.device,
            )
            loss_fn = NeuCLIPLoss(eps=cfg.normalizer_eps, rho=cfg.rho)
            return loss_fn, loss_fn, NPNEstimator(npn, cfg)
        if cfg.loss == "fastclip":
            if not dataset_size:
                raise ValueError("dataset_size: FastCLIP needs the number of samples in the data set")
            loss_fn = FastCLIPLoss(
                dataset_size,
                eps=cfg.normalizer_eps,
                rho=cfg.rho,
                gamma_min=cfg.fastclip_gamma_min,
                gamma_decay_epochs=cfg.fastclip_gamma_decay_epochs,
            )
            # the estimator updates the tables once per step (E9), so each micro-batch calls the E6 part alone
            return loss_fn, loss_fn.loss_with_alpha, TableEstimator(loss_fn)
        loss_fn = LOSSES[cfg.loss]()
        return loss_fn, loss_fn, NoEstimator()

    # -----------------------------------------------------------------------------------------------------------
    def _to_device(self, mb: dict) -> dict:
        dev = self.info.device
        dtype = {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.cfg.precision, torch.float32
        )
        ids, mask = mb["input_ids"], mb["attention_mask"]
        if self.cfg.text_padding == "longest":
            ids, mask = trim_text_padding(ids, mask)  # exact; the text tower runs only the batch's longest caption
        return {
            "pixel_values": mb["pixel_values"].to(dev, dtype, non_blocking=True),
            "input_ids": ids.to(dev, non_blocking=True),
            "attention_mask": mask.to(dev, non_blocking=True),
        }

    @torch.no_grad()
    def encode(self, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized (img, txt) features of a batch with the current encoders (a collective under ZeRO-3)."""
        out = self._encode(mb)
        return out["img"], out["txt"]

    def _encode(self, mb: dict) -> dict:
        out = self.ds(**self._to_device(mb))
        # the losses run in fp32 whatever the encoders' precision (log-domain sums over the global batch)
        return {k: v.float() for k, v in out.items()}

    def unsafe_to_save(self) -> str | None:
        """Collective: why this state must not become a checkpoint (the same answer on every rank), or None. A
        checkpoint taken while steps are being skipped, or holding non-finite values, resumes into the same
        failure."""
        if self.skipped_in_a_row:
            return "the last step was skipped"
        broken = any(not torch.isfinite(t).all() for t in self._weights_and_moments())
        # log-domain tables (FastCLIP's log u) hold -inf for a sample not seen yet (log 0): NaN and +inf are broken
        broken = broken or any(
            t.isnan().any() or t.isposinf().any() for t in _nested_tensors(self.estimator.state_dict())
        )
        return (
            "the weights or optimizer state hold non-finite values"
            if distributed.any_rank(broken, self.info.device)
            else None
        )

    def _weights_and_moments(self) -> list[torch.Tensor]:
        """This rank's share of the encoders' state: the module's parameters, the optimizer's (under ZeRO the fp32
        master partitions) and its moments."""
        base = getattr(self.optimizer, "optimizer", self.optimizer)  # ZeRO wraps the torch optimizer
        tensors = list(self.model.parameters())
        tensors += [p for group in base.param_groups for p in group["params"]]
        return tensors + [t for state in base.state.values() for t in state.values() if isinstance(t, torch.Tensor)]

    def _all_finite(self, *tensors: torch.Tensor) -> bool:
        """The same verdict on every rank (one all-reduce)."""
        return not distributed.any_rank(any(not torch.isfinite(t).all() for t in tensors), self.info.device)

    # -----------------------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict], *, step: int, epoch: int) -> dict:
        """One optimizer step (E7) over this rank's A micro-batches. Returns metrics (rank-local floats)."""
        if len(micro_batches) != self.accumulation:
            raise ValueError(f"micro_batches: expected {self.accumulation} micro-batches, got {len(micro_batches)}")
        t = self.timer
        # E7.1; A > 1 without graph, each micro-batch is re-encoded with graph for its backward (E8)
        with t("forward"), torch.set_grad_enabled(self.accumulation == 1):
            outputs = [self._encode(mb) for mb in micro_batches]
        with t("gather"):  # the global batch and log g_hat of every anchor (E1, E8)
            cache, batch = self._gather(outputs, micro_batches, step=step, epoch=epoch)
        if not self._all_finite(batch.img, batch.txt, batch.tau, batch.log_g_img, batch.log_g_txt):
            return self._skip("non-finite features")
        self.last_global_batch = (batch.img, batch.txt, batch.index)  # the normalizer-error diagnostic's MBCL estimate
        ds_skipped = self.ds.skipped_steps  # DeepSpeed's count of the updates it skipped (overflow)
        with t("npn"):
            snapshot = self.estimator.snapshot(batch)
            loss_args, metrics = self.estimator.prepare(batch)  # E7.2: alpha with the encoders frozen (E9: u)
        for a, micro_batch in enumerate(micro_batches):
            with t("backward"):
                feats, model_args = self._with_graph(a, micro_batch, cache, outputs)
                loss = self.loss_call(feats, **model_args, **loss_args)  # E7.3: the encoders' step, alpha frozen
                if a == 0:
                    if not self._all_finite(loss.detach()):
                        self.estimator.restore(snapshot)
                        return self._skip("non-finite loss")
                    loss_value = loss.detach()
                self.ds.backward(loss, scale_wrt_gas=False)  # each chunk's loss is the whole step's
            with t("optimizer"):
                self.ds.step()  # updates after the A-th micro-batch only
        if self.ds.skipped_steps != ds_skipped:  # the same verdict on every rank (DeepSpeed all-reduces it)
            self.estimator.restore(snapshot)
            if self.cfg.precision != "fp16":  # no loss scaler to recover: non-finite gradients, as a NaN step
                return self._skip("non-finite gradients")
            return self._skip_overflow(loss_value, float(batch.tau))
        with t("optimizer"):
            # the parameter back inside [tau_min, tau_max]; the tau-LR factor of the next step sees the new tau
            self.temperature_lr.tau = self.temperature.after_step(step)
        self.skipped_in_a_row = 0
        metrics.update(
            loss=self._mean_over_ranks(loss_value), tau=float(batch.tau), lr_tau=self.tau_lr(), skipped=False
        )
        return metrics

    def _gather(
        self, outputs: list[dict], micro_batches: list[dict], *, step: int, epoch: int
    ) -> tuple[Features, StepBatch]:
        """This rank's features against the global batch, gathered with gradient (E8; with A = 1 they carry the
        graph and are the loss's input as they are), and the detached global batch the estimator runs on."""
        img, txt = (torch.cat([out[side] for out in outputs]) for side in ("img", "txt"))
        cache = gather_features(img, txt)
        with torch.no_grad():
            tau = outputs[0]["tau"].detach()
            img_all, txt_all = cache.img_all.detach(), cache.txt_all.detach()
            local = Features(img.detach(), txt.detach(), img_all, txt_all, cache.offset)
            log_g_img, log_g_txt = (all_gather_no_grad(x) for x in batch_log_normalizers(local, tau))
        index = all_gather_no_grad(torch.cat([mb["index"] for mb in micro_batches]).to(self.info.device))
        return cache, StepBatch(
            img_all,
            txt_all,
            tau,
            log_g_img,
            log_g_txt,
            log_eps_plus(log_g_img, self.cfg.normalizer_eps),
            log_eps_plus(log_g_txt, self.cfg.normalizer_eps),
            index,
            slice(cache.offset, cache.offset + cache.local_size),
            step,
            epoch,
        )

    def _with_graph(
        self, a: int, micro_batch: dict, cache: Features, outputs: list[dict]
    ) -> tuple[Features, dict[str, torch.Tensor]]:
        """The loss inputs of micro-batch a with graph: the features (A = 1: as gathered; A > 1: the micro-batch
        re-encoded and spliced into the cache) and the model's other outputs, tau and SigLIP's bias. Those appear
        in every micro-batch's loss: they take their gradient from micro-batch 0 only."""
        if self.accumulation == 1:
            feats, fresh = cache, outputs[0]
        else:
            fresh = self._encode(micro_batch)
            feats = self._splice(a, fresh, cache)
        return feats, {k: v if a == 0 else v.detach() for k, v in fresh.items() if k not in ("img", "txt")}

    def _splice(self, a: int, fresh: dict, cache: Features) -> Features:
        """Local anchors and global batch for micro-batch a: the cached features, with the re-encoded micro-batch
        (with graph) in place of micro-batch a on every rank (gathered with gradient, E8)."""
        b, A, W = self.micro_batch, self.accumulation, self.info.world_size
        sides = []
        for cached, glob, x in ((cache.img, cache.img_all, fresh["img"]), (cache.txt, cache.txt_all, fresh["txt"])):
            local = torch.cat([cached[: a * b], x, cached[(a + 1) * b :]])
            parts = dist_fn.all_gather(x) if W > 1 else [x]
            blocks = []
            for r in range(W):
                block = glob[r * A * b : (r + 1) * A * b]
                blocks += [block[: a * b], parts[r], block[(a + 1) * b :]]
            sides.append((local, torch.cat(blocks)))
        return Features(sides[0][0], sides[1][0], sides[0][1], sides[1][1], cache.offset)

    def _mean_over_ranks(self, loss: torch.Tensor) -> float:
        """The loss averaged over ranks: the full-batch loss (E8)."""
        if self.info.world_size > 1:
            dist.all_reduce(loss)
            loss /= self.info.world_size
        return float(loss)

    def tau_lr(self) -> float:
        return next(g["lr"] for g in self.optimizer.param_groups if g.get("is_temperature"))

    def temperature_state(self) -> dict:
        return {"steps_at_bound": self.temperature.steps_at_bound}

    def load_temperature_state(self, state: dict) -> None:
        """After a checkpoint load: the stored tau as loaded (the scheduler restored its own copy of tau), and this
        run's temperature schedule (TemperatureLR.follow)."""
        self.temperature_lr.follow(*self._tau_schedule)
        self.temperature.value = self.temperature._read()
        self.temperature.steps_at_bound = int(state.get("steps_at_bound", 0))

    def _skip_overflow(self, loss_value: torch.Tensor, tau: float) -> dict:
        """An fp16 loss-scale overflow: DeepSpeed skipped the update (and lowered the scale); the estimator's update
        of this step has been undone, and the step counts as skipped. Not towards --max-skipped-in-a-row, nor as a
        step that makes a checkpoint unsafe: the weights are untouched and the scaler recovers by itself."""
        self.skipped_steps += 1
        return {
            "loss": self._mean_over_ranks(loss_value),
            "tau": tau,
            "skipped": True,
            "skip_reason": "fp16 loss-scale overflow",
        }

    def _skip(self, why: str) -> dict:
        """No parameter, NPN or u update happened; count it and abort after K in a row."""
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.cfg.max_skipped_in_a_row:
            raise TooManySkippedSteps(f"{self.skipped_in_a_row} steps in a row skipped ({why})")
        return {"loss": float("nan"), "tau": float("nan"), "skipped": True, "skip_reason": why}


def _nested_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _nested_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _nested_tensors(v)]
    return []
