"""One dataclass for a run: defaults < YAML file (--config) < command line. `validate()` checks everything before
any process group starts and raises ConfigError, which the entry point prints as one line and exits with code 2."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from .data.shards import expand_shards
from .presets import PRESETS

LOSS_CHOICES = ("neuclip", "fastclip", "mbcl", "siglip")
PRECISIONS = ("fp32", "bf16", "fp16")
REPORT_TO = ("none", "jsonl", "wandb")
ZERO_STAGES = (0, 1, 2, 3)


class ConfigError(ValueError):
    """A run configuration problem, reported as one line before anything starts."""


@dataclass
class TrainConfig:
    # model
    preset: str = "tiny"
    pretrained_hf: str | None = None
    grad_checkpointing: bool = False
    init_tau: float = 0.07
    tau_min: float = 0.01
    tau_max: float = 1.0
    tau_param: str = "log"
    zero_init: str = "auto"
    # loss
    loss: str = "neuclip"
    eps: float = 1e-14
    rho: float = 6.5
    fastclip_gamma_min: float = 0.2
    fastclip_gamma_decay_epochs: int = 10
    # NPN (E4, E5, E7)
    npn_prototypes: int = 4096
    npn_inner_steps: int = 10
    npn_restart_every: int = 500
    npn_lr: float = 0.05
    npn_variant: str = "tailored"
    npn_update: str = "alternating"
    npn_parallel: str = "sharded"
    npn_restart_resets_adagrad: bool = False
    # data
    dataset_dir: str | None = None
    train_data: str | None = None
    train_num_samples: int | None = None
    val_data: str | None = None
    tokenizer: str | None = None
    dataset_size: int | None = None
    workers: int = 0
    data_resampled: bool = False
    max_bad_fraction: float = 0.05
    text_padding: str = "longest"
    # optimization
    global_batch_size: int = 64
    steps: int | None = None
    epochs: int | None = None
    lr: float = 5e-4
    lr_tau: float | None = None
    lr_tau_schedule: str = "cosine"
    wd: float = 0.1
    warmup: int = 10
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1e-6
    grad_clip: float | None = None
    max_skipped_in_a_row: int = 5
    # system
    ds_config: str = "ds_configs/zero2.json"
    precision: str = "fp32"
    seed: int = 0
    output_dir: str = "runs/neuclip"
    resume: str | None = None
    overwrite: bool = False
    save_every: int = 0
    keep_last: int = 2
    eval_every: int = 0
    norm_err_every: int = 0
    norm_err_anchors: int = 256
    report_to: str = "jsonl"
    wandb_project: str = "neuclip_ds"
    wandb_offline: bool = False
    debug: bool = False
    # synthetic data (tests, benchmarks): sample count of a deterministic random set used when train_data is unset
    synthetic_samples: int = 0

    # ---------------------------------------------------------------------------------------------------------
    def ds_config_dict(self) -> dict:
        with open(self.ds_config) as f:
            return json.load(f)

    def tau_lr(self) -> float:
        """--lr-tau, or the encoders' --lr when unset."""
        return self.lr if self.lr_tau is None else self.lr_tau

    def gradient_accumulation_steps(self) -> int:
        return int(self.ds_config_dict().get("gradient_accumulation_steps", 1))

    def validate(self, world_size: int | None = None) -> "TrainConfig":
        """Raise ConfigError on the first problem found. world_size: from the launcher's env if not given."""
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.preset not in PRESETS and self.pretrained_hf is None:
            raise ConfigError(f"--preset: unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        if self.pretrained_hf is not None and not (Path(self.pretrained_hf) / "config.json").is_file():
            raise ConfigError(f"--pretrained-hf: {self.pretrained_hf} is not a transformers CLIPModel directory")
        if self.loss not in LOSS_CHOICES:
            raise ConfigError(f"--loss: unknown loss {self.loss!r} (choose from {', '.join(LOSS_CHOICES)})")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"--report-to: must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.zero_init not in ("auto", "on", "off"):
            raise ConfigError(f"--zero-init: must be auto, on or off, got {self.zero_init!r}")
        if self.npn_variant not in ("tailored", "mlp"):
            raise ConfigError(f"--npn-variant: must be tailored or mlp, got {self.npn_variant!r}")
        if self.npn_update not in ("alternating", "simultaneous"):
            raise ConfigError(f"--npn-update: must be alternating or simultaneous, got {self.npn_update!r}")
        if self.text_padding not in ("longest", "max_length"):
            raise ConfigError(f"--text-padding: must be longest or max_length, got {self.text_padding!r}")
        if self.tau_param not in ("log", "raw"):
            raise ConfigError(f"--tau-param: must be log or raw, got {self.tau_param!r}")
        if self.lr_tau_schedule not in ("cosine", "step_thresh"):
            raise ConfigError(f"--lr-tau-schedule: must be cosine or step_thresh, got {self.lr_tau_schedule!r}")
        for f in dataclasses.fields(self):   # inf/nan in any float option is a typo, never a setting
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name.replace('_', '-')}: must be a finite number, got {value}")
        if self.npn_parallel not in ("sharded", "replicated"):
            raise ConfigError(f"--npn-parallel: must be sharded or replicated, got {self.npn_parallel!r}")
        for name in ("npn_prototypes", "npn_restart_every", "global_batch_size", "keep_last",
                     "max_skipped_in_a_row"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")
        if self.norm_err_anchors < 2:
            raise ConfigError(f"--norm-err-anchors: must be >= 2, got {self.norm_err_anchors}")
        for name in ("npn_inner_steps", "warmup", "save_every", "eval_every", "synthetic_samples", "workers",
                     "norm_err_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        for name in ("npn_lr", "lr", "lr_tau", "init_tau", "tau_min", "tau_max"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")
        if not self.tau_min < self.tau_max:
            raise ConfigError(f"--tau-min: must be below --tau-max, got {self.tau_min} >= {self.tau_max}")
        if not self.tau_min <= self.init_tau <= self.tau_max:
            raise ConfigError(f"--init-tau: must lie in [--tau-min, --tau-max] = [{self.tau_min}, {self.tau_max}]")
        if self.eps < 0 or self.rho < 0 or self.wd < 0:
            raise ConfigError("--eps/--rho/--wd: must be >= 0")
        if self.fastclip_gamma_decay_epochs < 1:
            raise ConfigError(f"--fastclip-gamma-decay-epochs: must be >= 1, got {self.fastclip_gamma_decay_epochs}")
        if not 0 < self.fastclip_gamma_min <= 1:
            raise ConfigError(f"--fastclip-gamma-min: must be in (0, 1], got {self.fastclip_gamma_min}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"--max-bad-fraction: must be in [0, 1], got {self.max_bad_fraction}")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("--steps/--epochs: give exactly one of them")
        if (self.steps is not None and self.steps <= 0) or (self.epochs is not None and self.epochs <= 0):
            raise ConfigError("--steps/--epochs: must be > 0")
        # data
        if self.dataset_dir is not None:
            self._fill_from_dataset_dir()
        if self.train_data is None and self.synthetic_samples == 0:
            raise ConfigError("--train-data: no training data given (or use --synthetic-samples N)")
        if self.train_data is not None:
            shards = _check_shards("--train-data", self.train_data)
            if not self.data_resampled:
                _check_shard_count(len(shards), world_size, self.workers)
            if self.train_num_samples is None:
                raise ConfigError("--train-num-samples: required with --train-data (samples per epoch)")
        if self.val_data is not None:
            _check_shards("--val-data", self.val_data)
        if self.epochs is not None and self.train_data is None and self.synthetic_samples == 0:
            raise ConfigError("--epochs: needs a data set size (--train-num-samples)")
        if self.loss == "fastclip" and self.train_data is not None and self.dataset_size is None:
            raise ConfigError("--dataset-size: FastCLIP's u tables need the number of samples in the data set")
        if self.tokenizer is not None and not Path(self.tokenizer).is_dir():
            raise ConfigError(f"--tokenizer: {self.tokenizer} is not a directory")
        if self.train_data is not None and self.tokenizer is None:
            raise ConfigError("--tokenizer: required with --train-data (a local HF tokenizer directory)")
        # DeepSpeed config
        if not Path(self.ds_config).is_file():
            raise ConfigError(f"--ds-config: file not found: {self.ds_config}")
        try:
            ds = self.ds_config_dict()
        except json.JSONDecodeError as e:
            raise ConfigError(f"--ds-config: {self.ds_config} is not valid JSON ({e})") from None
        zero = ds.get("zero_optimization", {}) if isinstance(ds, dict) else None
        if not isinstance(zero, dict):
            raise ConfigError(f"--ds-config: {self.ds_config} must hold a JSON object with an object "
                              f"zero_optimization")
        _check_zero_keys(zero, self.ds_config)
        stage = zero.get("stage", 0)
        if stage not in ZERO_STAGES:
            raise ConfigError(f"--ds-config: unknown ZeRO stage {stage!r} in {self.ds_config} (use 0, 1, 2 or 3)")
        accum = ds.get("gradient_accumulation_steps", 1)
        if not isinstance(accum, int) or accum <= 0:
            raise ConfigError(f"--ds-config: gradient_accumulation_steps must be a positive integer, got {accum!r}")
        if self.global_batch_size % (world_size * accum):
            raise ConfigError(f"--global-batch-size: {self.global_batch_size} is not divisible by ranks x "
                              f"accumulation = {world_size} x {accum}")
        if self.global_batch_size // world_size < 2 and world_size == 1:
            raise ConfigError("--global-batch-size: need at least 2 pairs for negatives")
        from .rundir import check_writable   # rundir imports this module

        check_writable(self.output_dir)
        self._check_memory(world_size)
        return self

    def _embed_dim(self) -> int:
        if self.pretrained_hf is None:
            return PRESETS[self.preset].embed_dim
        with open(Path(self.pretrained_hf) / "config.json") as f:
            return int(json.load(f).get("projection_dim", 512))   # transformers' CLIPConfig default

    def _check_memory(self, world_size: int) -> None:
        """Refuse sizes whose per-rank state alone cannot fit where it will live (the encoders and activations
        come on top, so passing says little; failing means the run cannot start)."""
        if self.loss == "neuclip" and self.npn_variant == "tailored":   # the MLP variant has a fixed size
            need = npn_state_bytes(self.npn_prototypes, self._embed_dim())
            _check_fits("--npn-prototypes", f"{self.npn_prototypes} prototypes", need, on_gpu=uses_cuda())
        if self.loss == "fastclip":
            samples = self.dataset_size or self.synthetic_samples
            need = fastclip_table_bytes(samples, world_size)
            _check_fits("--dataset-size", f"FastCLIP's u tables for {samples} samples", need, on_gpu=False)

    def _fill_from_dataset_dir(self) -> None:
        """--dataset-dir: a data set built by neuclip_ds (the embedded one) fills the unset data options."""
        from .data.embedded import dataset_paths

        try:
            paths = dataset_paths(self.dataset_dir)
        except FileNotFoundError as e:
            raise ConfigError(f"--dataset-dir: {e}") from None
        self.train_data = self.train_data or paths["train"]
        self.val_data = self.val_data or paths["val"]
        self.tokenizer = self.tokenizer or paths["tokenizer"]
        self.train_num_samples = self.train_num_samples or paths["num_train"]
        self.dataset_size = self.dataset_size or paths["num_train"]

    def zero_stage(self) -> int:
        return int(self.ds_config_dict().get("zero_optimization", {}).get("stage", 0))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_shards(flag: str, pattern: str) -> list[str]:
    """The usable shards of a spec, expanded as the loaders will expand it; ConfigError when there are none."""
    try:
        return expand_shards(pattern)[0]
    except FileNotFoundError as e:
        raise ConfigError(f"{flag}: {e}") from None


def _check_shard_count(shards: int, world_size: int, workers: int) -> None:
    """Without resampling each (rank, worker) reads its own shards: with fewer shards some ranks would run out of
    data while the others wait for them in the next collective."""
    readers = world_size * max(1, workers)
    if shards < readers:
        raise ConfigError(f"--train-data: {shards} readable shard(s) for {world_size} rank(s) x {max(1, workers)} "
                          f"worker(s): give at least {readers} shards, fewer --workers, or --data-resampled")


def _zero_keys() -> set[str]:
    """Every key DeepSpeed's own ZeRO config model takes (field names, their stage3_* aliases, deprecated names),
    read from the installed DeepSpeed, which refuses any other key with a traceback at initialization."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    return set(fields) | {f.alias for f in fields.values() if f.alias}


def _check_zero_keys(zero: dict, path: str) -> None:
    known = _zero_keys()
    for key in zero:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--ds-config: unknown key {key!r} in zero_optimization of {path}{hint}")


# -------------------------------------------------------------------------------------------------------------
# memory estimates
# -------------------------------------------------------------------------------------------------------------
_FP32 = 4


def npn_state_bytes(prototypes: int, embed_dim: int) -> int:
    """One rank's tailored NPN (npn.py; every rank holds a replica): 2 prototype tables of m x d fp32 with their
    gradients and AdaGrad sums, plus the engine's per-step snapshot of the parameters and sums (to undo a
    skipped step): 5 copies of 2 m d numbers."""
    return 5 * 2 * prototypes * embed_dim * _FP32


def fastclip_table_bytes(samples: int, world_size: int) -> int:
    """One rank's FastCLIP u tables (losses.ShardedLogTable, on the host): 2 tables of this rank's
    ceil(n / world_size) samples in fp32, plus the engine's per-step snapshot of both."""
    return 2 * 2 * -(-samples // world_size) * _FP32


def uses_cuda() -> bool:
    """Whether the run puts its tensors on CUDA (engine.init_distributed): when present and not DS_ACCELERATOR=cpu."""
    import torch

    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def _gpu_bytes() -> int:
    """Total memory of this rank's GPU (the free amount would need a CUDA context before the run makes one)."""
    import torch

    return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory


def _host_bytes_available() -> int:
    import psutil

    return psutil.virtual_memory().available


def _ranks_on_this_node() -> int:
    """Ranks sharing this host's memory: torchrun/accelerate set LOCAL_WORLD_SIZE, the deepspeed launcher
    LOCAL_SIZE."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))


def _check_fits(flag: str, what: str, per_rank: int, *, on_gpu: bool) -> None:
    """ConfigError when per_rank bytes on each rank exceed this rank's GPU, or the host memory available now to
    all ranks of this node."""
    ranks = 1 if on_gpu else _ranks_on_this_node()
    have = _gpu_bytes() if on_gpu else _host_bytes_available()
    if per_rank * ranks > have:
        need = _gib(per_rank) + " per rank" + (f" x {ranks} ranks on this host" if ranks > 1 else "")
        where = "GPU memory" if on_gpu else "host memory available"
        raise ConfigError(f"{flag}: {what} need ~{need}, more than the {_gib(have)} of {where}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


# -------------------------------------------------------------------------------------------------------------
# command line
# -------------------------------------------------------------------------------------------------------------
_GROUPS = {
    "model": ["preset", "pretrained_hf", "grad_checkpointing", "zero_init"],
    "temperature": ["init_tau", "tau_min", "tau_max", "tau_param", "lr_tau", "lr_tau_schedule"],
    "loss": ["loss", "eps", "rho", "fastclip_gamma_min", "fastclip_gamma_decay_epochs"],
    "NPN (NeuCLIP)": ["npn_prototypes", "npn_inner_steps", "npn_restart_every", "npn_lr", "npn_variant",
                      "npn_update", "npn_parallel", "npn_restart_resets_adagrad"],
    "data": ["dataset_dir", "train_data", "train_num_samples", "val_data", "tokenizer", "dataset_size", "workers",
             "data_resampled", "max_bad_fraction", "text_padding", "synthetic_samples"],
    "optimization": ["global_batch_size", "steps", "epochs", "lr", "wd", "warmup", "beta1", "beta2", "adam_eps",
                     "grad_clip", "max_skipped_in_a_row"],
    "system": ["ds_config", "precision", "seed", "output_dir", "resume", "overwrite", "save_every", "keep_last",
               "eval_every", "report_to", "wandb_project", "wandb_offline", "norm_err_every", "norm_err_anchors",
               "debug"],
}
_HELP = {
    "preset": "model preset: " + ", ".join(PRESETS),
    "pretrained_hf": "local transformers CLIPModel directory to fine-tune (no download)",
    "grad_checkpointing": "activation checkpointing in both towers",
    "zero_init": "build the model under deepspeed.zero.Init (auto: ZeRO-3 with ViT-L/H presets)",
    "init_tau": "initial temperature tau", "tau_min": "lower bound of tau (kept on the parameter after every step)",
    "tau_max": "upper bound of tau",
    "tau_param": "how tau is stored: log (logit_scale = log 1/tau, as OpenCLIP/FastCLIP: steps change tau by a "
                 "fraction of itself) or raw (tau itself: steps move it by about the learning rate)",
    "lr_tau": "learning rate of the temperature (default: --lr); its own AdamW group without weight decay",
    "lr_tau_schedule": "cosine (the encoders' schedule) or step_thresh (FastCLIP-v3: warmup, then constant, "
                       "divided by 3 while tau <= 0.03)",
    "loss": "neuclip (E6 + NPN), fastclip (E9 u tables), mbcl (InfoNCE), siglip",
    "eps": "epsilon of E1", "rho": "rho of E1 (2 rho tau term)",
    "npn_prototypes": "m, prototypes per side (E4)", "npn_inner_steps": "T_u, NPN AdaGrad steps per step (E7.2)",
    "npn_restart_every": "T_r, restart the NPN from the batch every T_r steps (E7.4)",
    "npn_lr": "NPN AdaGrad learning rate",
    "npn_restart_resets_adagrad": "also reset AdaGrad's accumulators at a restart (E7.4)", "npn_variant": "tailored (E4) or mlp (ablation)",
    "npn_update": "alternating (E7) or simultaneous (ablation: alpha predicted before the NPN step)",
    "npn_parallel": "E8: sharded (each rank's inner steps on its own anchors, NPN gradients all-reduced: NPN cost "
                    "per rank O(b_local)) or replicated (every rank runs the whole global batch: O(B), no "
                    "communication)",
    "dataset_dir": "a data set built by neuclip_ds (sets train/val data, tokenizer, sizes)",
    "train_data": "webdataset shards, brace-expanded, '::'-joined lists", "train_num_samples": "samples per epoch",
    "val_data": "held-out webdataset shards", "tokenizer": "local HF tokenizer directory",
    "dataset_size": "number of samples in the data set (FastCLIP u tables); a sample whose index is outside "
                    "[0, SIZE) is skipped and counted as bad_index",
    "max_bad_fraction": "stop when the fraction of skipped bad samples passes this",
    "text_padding": "longest: the text tower runs only up to the batch's longest caption (exact: causal "
                    "attention, EOS pooling); max_length: always the full context length (static shapes)",
    "synthetic_samples": "train on a deterministic synthetic set of N samples (tests, benchmarks)",
    "global_batch_size": "pairs per optimizer step over all ranks and micro-batches", "warmup": "warmup steps",
    "max_skipped_in_a_row": "abort after this many non-finite steps in a row",
    "ds_config": "DeepSpeed JSON (ZeRO stage, accumulation, clipping)", "precision": "fp32, bf16 or fp16",
    "resume": "auto (latest in output dir) or a checkpoint directory",
    "overwrite": "start over in an --output-dir that holds a run: remove that run's files (config.yaml, "
                 "metrics.jsonl, summary.json, eval_results.json, plots/training.png, checkpoints/) and nothing "
                 "else; without it (or --resume) such a directory is refused",
    "save_every": "checkpoint every N steps (0: only at the end)", "eval_every": "evaluate every N steps (0: end)",
    "norm_err_every": "every N steps: exact log-normalizer of fixed anchors over the whole training set vs "
                      "the estimates (norm_err in metrics.jsonl; 0: off)",
    "norm_err_anchors": "number of fixed anchors of the normalizer-error diagnostic",
    "report_to": "none, jsonl (metrics.jsonl) or wandb (+ jsonl)",
    "debug": "an error prints its full traceback from every rank (otherwise one line, from the first rank)",
}

_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}   # "int", "float | None", ... (annotations)
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuclip-train", description="Train CLIP with NeuCLIP (or FastCLIP/MBCL/SigLIP) under DeepSpeed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file of options (keys as the long flags, with _ or -); "
                        "command-line flags override it")
    defaults = TrainConfig()
    for group_name, names in _GROUPS.items():
        group = parser.add_argument_group(group_name)
        for name in names:
            flag = "--" + name.replace("_", "-")
            default = getattr(defaults, name)
            if _TYPES[name] == "bool":
                group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                   help=_HELP.get(name, "") + f" (default {default})")
                continue
            # values stay strings here and are converted with the YAML values (`_coerce`): one rule, one-line errors
            group.add_argument(flag, dest=name, default=None, metavar=name.split("_")[-1].upper(),
                               help=_HELP.get(name, "") + f" (default {default})")
    # DeepSpeed's launcher passes --local_rank unless --no_local_rank is given
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank", None)
    values: dict = {}
    config_file = args.pop("config")
    if config_file:
        if not Path(config_file).is_file():
            raise ConfigError(f"--config: file not found: {config_file}")
        with open(config_file) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {config_file} must hold a mapping of options")
        for key, value in loaded.items():
            key = str(key).replace("-", "_")
            if key not in _TYPES:
                raise ConfigError(f"--config: unknown option {key!r} in {config_file}")
            values[key] = value
    values.update({k: v for k, v in args.items() if v is not None})
    # launched by `accelerate launch` with its DeepSpeed plugin: use the plugin's JSON unless one was given
    if "ds_config" not in values and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        values["ds_config"] = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    return TrainConfig(**{name: _coerce(name, value) for name, value in values.items()})


def _coerce(name: str, value):
    """A YAML or command-line value as the option's type; ConfigError naming the option and the type otherwise.
    Numbers may come as strings: YAML reads 1e-3 (no dot) as one, and the command line gives nothing else."""
    kind = _TYPES[name].removesuffix(" | None")
    if value is None and _TYPES[name].endswith(" | None"):
        return None
    try:
        return _CONVERT[kind](value)
    except (TypeError, ValueError):
        hint = " (YAML reads on/off/yes/no as true/false: quote it)" if kind == "str" and isinstance(value, bool) \
            else ""
        raise ConfigError(f"--{name.replace('_', '-')}: expected {_EXPECTED[kind]}, got {value!r}{hint}") from None


def _scalar(value) -> int | float | str:
    """value itself if it is a number or a string; bool (an int to Python) and lists, mappings, null are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return value


def _to_int(value) -> int:
    value = _scalar(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)   # exact, also past float precision
    number = float(value)   # 1e6, 100.0
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def _to_bool(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(value)
    return value


_CONVERT = {"int": _to_int, "float": lambda v: float(_scalar(v)), "bool": _to_bool,
            "str": lambda v: str(_scalar(v))}   # a number where a name goes (output_dir: 2024) is that name
