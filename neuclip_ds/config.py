"""One dataclass for a run: defaults < YAML file (--config) < command line.

Each option is one `TrainConfig` field: its type (a `Literal` lists the choices), default, help text and --help group
all live there, and the flag (--name-with-dashes), the YAML key (the name, with _ or -), the type check of YAML and
command-line values and the choice check all derive from it. `resolve()` reads what the options point to once (the
DeepSpeed JSON, a --dataset-dir) into a new config; `validate()` checks everything before any process group starts,
returns that resolved config and leaves its own untouched. Problems raise ConfigError, which the entry point prints
as one line and exits with code 2."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data.shards import expand_shards
from .presets import PRESETS

if typing.TYPE_CHECKING:
    from .model import Geometry

ZERO_STAGES = (0, 1, 2, 3)
REPORTERS = ("jsonl", "wandb", "tensorboard", "none")
DEFAULT_GLOBAL_BATCH = 64
DEFAULT_LOG_EVERY = 50  # --log-every unset and stderr not a terminal (a SLURM log, a pipe): a line every 50 steps
# pairs of options that say the same thing two ways: at most one of each is given, and one given on the command
# line replaces the other from the YAML file (--steps overrides a YAML's epochs)
EXCLUSIVE = (
    ("steps", "epochs"),
    ("global_batch_size", "batch_size"),
    ("save_every", "save_frequency"),
    ("eval_every", "zeroshot_frequency"),
)
# OpenCLIP's names for values, read as ours
VALUE_ALIASES = {
    "precision": {"amp": "fp16", "amp_bf16": "bf16", "amp_bfloat16": "bf16"},
    "resume": {"latest": "auto"},
}
# names that mean different things here and in OpenCLIP: refused with what to use instead
AMBIGUOUS = {"eps": "ambiguous: NeuCLIP's epsilon of E1 is --normalizer-eps, AdamW's is --adam-eps"}
SHIPPED_DS_CONFIGS = Path(__file__).resolve().parent / "ds_configs"  # package data: --ds-config NAME
SHIPPED_DS_CONFIG_NAMES = ", ".join(sorted(p.stem for p in SHIPPED_DS_CONFIGS.glob("*.json")))

# the --help groups, in their order there (the first option of a group places it)
MODEL, TEMPERATURE, LOSS, NPN, DATA, OPTIMIZATION, SYSTEM = (
    "model",
    "temperature",
    "loss",
    "NPN (NeuCLIP)",
    "data",
    "optimization",
    "system",
)


class ConfigError(ValueError):
    """A run configuration problem, reported as one line before anything starts."""


def opt(default: Any, help: str, group: str, *, aliases: tuple[str, ...] = ()) -> Any:
    """A TrainConfig option; the flag, YAML key and --help entry are made from it (`build_parser`). aliases: other
    names of the same option (OpenCLIP's flag names), accepted as flags and YAML keys alike.
    A default of None means "unset": the help text says what happens then, and --help shows no default."""
    return field(default=default, metadata={"help": help, "group": group, "aliases": aliases})


@dataclass(frozen=True)
class DeepSpeedJSON:
    """--ds-config as `TrainConfig.resolve()` read it: the JSON as written and the settings the run takes from it."""

    path: str
    settings: dict  # the file's object; build_ds_config adds batch sizes and precision to a copy
    zero_stage: int
    gradient_accumulation_steps: int
    gradient_clipping: float  # --grad-clip when given, else the JSON's; 0: off (DeepSpeed's default)


@dataclass
class TrainConfig:
    """The options of a run, one `opt` field each, in their --help order; `ds` once resolved."""

    preset: str = opt("tiny", "model preset: " + ", ".join(PRESETS), MODEL, aliases=("model",))
    pretrained_hf: str | None = opt(
        None, "local transformers CLIPModel directory to fine-tune (no download; unset: random init)", MODEL
    )
    grad_checkpointing: bool = opt(False, "activation checkpointing in both towers", MODEL)
    zero_init: Literal["auto", "on", "off"] = opt(
        "auto", "build the model under deepspeed.zero.Init (auto: ZeRO-3 with ViT-L/H presets)", MODEL
    )

    init_tau: float = opt(0.07, "initial temperature tau", TEMPERATURE)
    tau_min: float = opt(0.01, "lower bound of tau (kept on the parameter after every step)", TEMPERATURE)
    tau_max: float = opt(1.0, "upper bound of tau", TEMPERATURE)
    tau_param: Literal["log", "raw"] = opt(
        "log",
        "how tau is stored: log (logit_scale = log 1/tau, as OpenCLIP/FastCLIP: steps change tau by a "
        "fraction of itself) or raw (tau itself: steps move it by about the learning rate)",
        TEMPERATURE,
    )
    lr_tau: float | None = opt(
        None, "learning rate of the temperature (unset: --lr); its own AdamW group without weight decay", TEMPERATURE
    )
    lr_tau_schedule: Literal["cosine", "step_thresh"] = opt(
        "cosine",
        "cosine (the encoders' schedule) or step_thresh (FastCLIP-v3: warmup, then constant, divided by 3 "
        "while tau <= 0.03)",
        TEMPERATURE,
    )

    loss: Literal["neuclip", "fastclip", "mbcl", "siglip"] = opt(
        "neuclip", "neuclip (E6 + NPN), fastclip (E9 u tables), mbcl (InfoNCE), siglip", LOSS
    )
    normalizer_eps: float = opt(1e-14, "NeuCLIP's epsilon inside E1's log (not AdamW's: --adam-eps)", LOSS)
    rho: float = opt(6.5, "rho of E1 (2 rho tau term)", LOSS)
    fastclip_gamma_min: float = opt(0.2, "FastCLIP's final gamma of the u-table moving average (E9)", LOSS)
    fastclip_gamma_decay_epochs: int = opt(10, "epochs over which FastCLIP's gamma decays from 1 to its minimum", LOSS)

    npn_prototypes: int = opt(4096, "m, prototypes per side (E4)", NPN)
    npn_inner_steps: int = opt(10, "T_u, NPN AdaGrad steps per step (E7.2)", NPN)
    npn_restart_every: int = opt(500, "T_r, restart the NPN from the batch every T_r steps (E7.4)", NPN)
    npn_lr: float = opt(0.05, "NPN AdaGrad learning rate", NPN)
    npn_variant: Literal["tailored", "mlp"] = opt("tailored", "tailored (E4) or mlp (ablation)", NPN)
    npn_update: Literal["alternating", "simultaneous"] = opt(
        "alternating", "alternating (E7) or simultaneous (ablation: alpha predicted before the NPN step)", NPN
    )
    npn_parallel: Literal["sharded", "replicated"] = opt(
        "sharded",
        "E8: sharded (each rank's inner steps on its own anchors, NPN gradients all-reduced: NPN cost per "
        "rank O(b_local)) or replicated (every rank runs the whole global batch: O(B), no communication)",
        NPN,
    )
    npn_restart_resets_adagrad: bool = opt(False, "also reset AdaGrad's accumulators at a restart (E7.4)", NPN)

    dataset_dir: str | None = opt(None, "a data set built by neuclip_ds (sets train/val data, tokenizer, sizes)", DATA)
    train_data: str | None = opt(None, "webdataset shards, brace-expanded, '::'-joined lists", DATA)
    train_num_samples: int | None = opt(None, "samples per epoch (required with --train-data)", DATA)
    val_data: str | None = opt(None, "held-out webdataset shards (unset: no evaluation)", DATA)
    tokenizer: str | None = opt(
        None, "local HF tokenizer directory (unset: --pretrained-hf's directory when it holds a tokenizer)", DATA
    )
    dataset_size: int | None = opt(
        None,
        "number of samples in the data set (FastCLIP u tables); a sample whose index is outside [0, SIZE) is "
        "skipped and counted as bad_index",
        DATA,
    )
    workers: int = opt(0, "data loader worker processes per rank", DATA)
    data_resampled: bool = opt(
        False,
        "draw shards with replacement (no epochs over the shards, no shard count check)",
        DATA,
        aliases=("dataset_resampled",),
    )
    max_bad_fraction: float = opt(0.05, "stop when the fraction of skipped bad samples passes this", DATA)
    text_padding: Literal["longest", "max_length"] = opt(
        "longest",
        "longest: the text tower runs only up to the batch's longest caption (exact: causal attention, EOS "
        "pooling); max_length: always the full context length (static shapes)",
        DATA,
    )
    synthetic_samples: int = opt(0, "train on a deterministic synthetic set of N samples (tests, benchmarks)", DATA)

    global_batch_size: int | None = opt(
        None,
        "pairs per optimizer step over all ranks and micro-batches (unset: 64, or from --batch-size)",
        OPTIMIZATION,
    )
    batch_size: int | None = opt(
        None,
        "pairs per rank and micro-batch, as OpenCLIP's --batch-size: the global batch is this x ranks x "
        "accumulation (instead of --global-batch-size)",
        OPTIMIZATION,
    )
    accum_freq: int | None = opt(
        None,
        "micro-batches per optimizer step, in place of the DeepSpeed JSON's gradient_accumulation_steps "
        "(unset: the JSON's, else 1)",
        OPTIMIZATION,
    )
    steps: int | None = opt(None, "optimizer steps of the run (or --epochs)", OPTIMIZATION)
    epochs: int | None = opt(None, "epochs of the run (or --steps)", OPTIMIZATION)
    lr: float = opt(5e-4, "peak learning rate of the encoders (warmup, then cosine)", OPTIMIZATION)
    wd: float = opt(0.1, "AdamW weight decay of the weight matrices", OPTIMIZATION)
    warmup: int = opt(10, "warmup steps", OPTIMIZATION)
    beta1: float = opt(0.9, "AdamW beta1", OPTIMIZATION)
    beta2: float = opt(0.98, "AdamW beta2", OPTIMIZATION)
    adam_eps: float = opt(1e-6, "AdamW epsilon", OPTIMIZATION)
    # the one owner of clipping at run time is `DeepSpeedJSON.gradient_clipping` (resolve())
    grad_clip: float | None = opt(
        None,
        "gradient clipping norm, in place of the DeepSpeed JSON's gradient_clipping (unset: the JSON's; 0: off)",
        OPTIMIZATION,
        aliases=("grad_clip_norm",),
    )
    max_skipped_in_a_row: int = opt(5, "abort after this many non-finite steps in a row", OPTIMIZATION)

    ds_config: str = opt(
        "zero2",
        "DeepSpeed JSON (ZeRO stage, accumulation, clipping unless --grad-clip): a path, or the name of one shipped "
        "with neuclip_ds: " + SHIPPED_DS_CONFIG_NAMES,
        SYSTEM,
    )
    precision: Literal["fp32", "bf16", "fp16", "pure_bf16"] = opt(
        "fp32",
        "fp32; bf16 (= amp_bf16: bf16 compute, fp32 master weights); fp16 (= amp: fp16 compute with loss scaling, "
        "fp32 master weights); pure_bf16 (bf16 weights, gradients and optimizer states; ZeRO 1-3)",
        SYSTEM,
    )
    seed: int = opt(0, "random seed (weights, data order, augmentation)", SYSTEM)
    output_dir: str = opt("runs/neuclip", "run directory: config, metrics, checkpoints, evaluation", SYSTEM)
    resume: str | None = opt(
        None, "auto (= latest: the output dir's latest checkpoint, if any) or a checkpoint directory", SYSTEM
    )
    overwrite: bool = opt(
        False,
        "start over in an --output-dir that holds a run: remove that run's files (config.yaml, metrics.jsonl, "
        "summary.json, eval_results.json, plots/training.png, checkpoints/, tensorboard/, profile/) and nothing else; "
        "without it (or --resume) such a directory is refused",
        SYSTEM,
    )
    save_every: int = opt(0, "checkpoint every N steps (0: only at the end)", SYSTEM)
    save_frequency: int = opt(0, "checkpoint every N epochs, as OpenCLIP (0: as --save-every)", SYSTEM)
    keep_last: int = opt(2, "checkpoints kept in the output dir", SYSTEM)
    eval_every: int = opt(0, "evaluate every N steps (0: at the end only)", SYSTEM)
    zeroshot_frequency: int = opt(0, "evaluate every N epochs, as OpenCLIP (0: as --eval-every)", SYSTEM)
    report_to: str = opt(
        "jsonl",
        "comma list of " + ", ".join(REPORTERS) + ": metrics.jsonl is always written; wandb/tensorboard add "
        "reporters (tensorboard: event files in <output-dir>/tensorboard/); none = no other reporter",
        SYSTEM,
    )
    wandb_project: str = opt("neuclip_ds", "wandb project (--report-to wandb)", SYSTEM, aliases=("wandb_project_name",))
    wandb_offline: bool = opt(False, "wandb in offline mode (sync later)", SYSTEM)
    log_every: int | None = opt(
        None,
        "progress as one plain line every N steps (and at the last step) instead of a progress bar (unset: the bar "
        f"when stderr is a terminal, else a line every {DEFAULT_LOG_EVERY} steps: no carriage-return redraws in "
        "log files)",
        SYSTEM,
    )
    norm_err_every: int = opt(
        0,
        "every N steps: exact log-normalizer of fixed anchors over the whole training set vs the estimates "
        "(norm_err in metrics.jsonl; 0: off)",
        SYSTEM,
    )
    norm_err_anchors: int = opt(256, "number of fixed anchors of the normalizer-error diagnostic", SYSTEM)
    peak_tflops: float | None = opt(
        None,
        "peak TFLOPS of one rank's device in the run's precision, for mfu (achieved model TFLOPS / peak) in "
        "metrics.jsonl (unset: on CPU a matmul timed at start-up; on a GPU mfu is left out; docs/performance.md)",
        SYSTEM,
    )
    profile_steps: str | None = opt(
        None,
        "FIRST:LAST: run torch.profiler over these steps (1-based, as in metrics.jsonl) and write each rank's Chrome "
        "trace and per-operator times to <output-dir>/profile/ (docs/performance.md)",
        SYSTEM,
    )
    host_malloc: Literal["tuned", "glibc"] = opt(
        "tuned",
        "tuned: on a CPU run, glibc malloc keeps freed memory for the next step instead of returning it to the kernel "
        "(fewer page faults; left as found when LD_PRELOAD, MALLOC_*_ or GLIBC_TUNABLES choose the allocator); "
        "glibc: glibc's own settings (docs/performance.md)",
        SYSTEM,
    )
    debug: bool = opt(
        False, "an error prints its full traceback from every rank (otherwise one line, from the first rank)", SYSTEM
    )

    # not an option: what `resolve()` read from --ds-config (None before)
    ds: DeepSpeedJSON | None = field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------------------------------------------------
    def tau_lr(self) -> float:
        """--lr-tau, or the encoders' --lr when unset."""
        return self.lr if self.lr_tau is None else self.lr_tau

    def micro_batch(self, world_size: int) -> int:
        """Pairs per rank and micro-batch: the global batch over ranks x accumulation (on a resolved config)."""
        return self.global_batch_size // (world_size * self.ds.gradient_accumulation_steps)

    def to_dict(self) -> dict:
        """The options (what config.yaml holds, and --config reads back)."""
        return {f.name: getattr(self, f.name) for f in _OPTIONS}

    def resolve(self, world_size: int = 1) -> TrainConfig:
        """A copy with what the options point to read once: the data options a --dataset-dir fills (those left
        unset), the tokenizer a --pretrained-hf directory holds, the DeepSpeed JSON (`ds`) and the global batch
        (--batch-size x ranks x accumulation, else 64). Pure: this config is left as given. ConfigError when
        something cannot be read."""
        ds = read_ds_config(self.ds_config, self.grad_clip, self.accum_freq)
        if self.global_batch_size is not None:
            global_batch = self.global_batch_size
        elif self.batch_size is not None:
            global_batch = self.batch_size * world_size * ds.gradient_accumulation_steps
        else:
            global_batch = DEFAULT_GLOBAL_BATCH
        filled = {"tokenizer": self.tokenizer or _hf_tokenizer_dir(self.pretrained_hf), **self._dataset_dir_values()}
        return dataclasses.replace(
            self,
            **filled,
            global_batch_size=global_batch,
            batch_size=None,  # the resolved form: one batch option, as config.yaml records and --config reads back
            ds=ds,
        )

    def validate(self, world_size: int | None = None) -> TrainConfig:
        """The resolved config (`resolve()`) once every check passed; ConfigError on the first problem found.
        world_size: from the launcher's env if not given."""
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._check_values()
        cfg = self.resolve(world_size)
        cfg._check_data(world_size)
        cfg._check_deepspeed(world_size)
        from .rundir import check_writable  # rundir imports this module

        check_writable(cfg.output_dir)
        cfg._check_memory(world_size)
        return cfg

    def _check_values(self) -> None:
        """The options on their own and against each other (nothing read from disk but --pretrained-hf)."""
        if self.preset not in PRESETS and self.pretrained_hf is None:
            raise ConfigError(f"--preset: unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        if self.pretrained_hf is not None and not (Path(self.pretrained_hf) / "config.json").is_file():
            raise ConfigError(f"--pretrained-hf: {self.pretrained_hf} is not a transformers CLIPModel directory")
        if self.pretrained_hf is not None:  # a config.json that is not a CLIPModel's: one line, not a traceback
            self.geometry()
        for f in _OPTIONS:
            value, choices = getattr(self, f.name), _KINDS[f.name].choices
            if choices and value not in choices:
                raise ConfigError(f"{_flag(f.name)}: must be {_one_of(choices)}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):  # inf/nan is a typo, never a setting
                raise ConfigError(f"{_flag(f.name)}: must be a finite number, got {value}")
        for name in (
            "npn_prototypes",
            "npn_restart_every",
            "global_batch_size",
            "batch_size",
            "accum_freq",
            "keep_last",
            "max_skipped_in_a_row",
            "log_every",
        ):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{_flag(name)}: must be > 0, got {getattr(self, name)}")
        for a, b in EXCLUSIVE:
            if getattr(self, a) not in (None, 0) and getattr(self, b) not in (None, 0):
                raise ConfigError(f"{_flag(a)}/{_flag(b)}: give one of them, not both")
        unknown = set(self.report_to.split(",")) - set(REPORTERS)
        if unknown or ("none" in self.report_to.split(",") and self.report_to != "none"):
            raise ConfigError(
                f"--report-to: a comma list of {', '.join(REPORTERS)} (none alone), got {self.report_to!r}"
            )
        if self.norm_err_anchors < 2:
            raise ConfigError(f"--norm-err-anchors: must be >= 2, got {self.norm_err_anchors}")
        for name in (
            "npn_inner_steps",
            "warmup",
            "save_every",
            "save_frequency",
            "eval_every",
            "zeroshot_frequency",
            "synthetic_samples",
            "workers",
            "norm_err_every",
            "grad_clip",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)}: must be >= 0, got {getattr(self, name)}")
        for name in ("npn_lr", "lr", "lr_tau", "init_tau", "tau_min", "tau_max", "peak_tflops"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{_flag(name)}: must be > 0, got {getattr(self, name)}")
        if self.profile_steps is not None:
            from .profiling import StepRange  # imports torch: only when asked

            try:
                StepRange.parse(self.profile_steps)
            except ValueError as e:
                raise ConfigError(f"--profile-steps: {e}") from None
        if not self.tau_min < self.tau_max:
            raise ConfigError(f"--tau-min: must be below --tau-max, got {self.tau_min} >= {self.tau_max}")
        if not self.tau_min <= self.init_tau <= self.tau_max:
            raise ConfigError(f"--init-tau: must lie in [--tau-min, --tau-max] = [{self.tau_min}, {self.tau_max}]")
        if self.normalizer_eps < 0 or self.rho < 0 or self.wd < 0:
            raise ConfigError("--normalizer-eps/--rho/--wd: must be >= 0")
        if self.fastclip_gamma_decay_epochs < 1:
            raise ConfigError(f"--fastclip-gamma-decay-epochs: must be >= 1, got {self.fastclip_gamma_decay_epochs}")
        if not 0 < self.fastclip_gamma_min <= 1:
            raise ConfigError(f"--fastclip-gamma-min: must be in (0, 1], got {self.fastclip_gamma_min}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"--max-bad-fraction: must be in [0, 1], got {self.max_bad_fraction}")
        if self.steps is None and self.epochs is None:
            raise ConfigError("--steps/--epochs: give one of them")
        if (self.steps is not None and self.steps <= 0) or (self.epochs is not None and self.epochs <= 0):
            raise ConfigError("--steps/--epochs: must be > 0")

    def _check_data(self, world_size: int) -> None:
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
        if self.loss == "fastclip" and self.train_data is not None and self.dataset_size is None:
            raise ConfigError("--dataset-size: FastCLIP's u tables need the number of samples in the data set")
        if self.tokenizer is not None and not Path(self.tokenizer).is_dir():
            raise ConfigError(f"--tokenizer: {self.tokenizer} is not a directory")
        if self.train_data is not None and self.tokenizer is None:
            raise ConfigError("--tokenizer: required with --train-data (a local HF tokenizer directory)")
        if self.val_data is not None and self.tokenizer is None:  # synthetic training data need none, evaluation does
            raise ConfigError("--tokenizer: required with --val-data (a local HF tokenizer directory)")

    def _check_deepspeed(self, world_size: int) -> None:
        _check_zero_keys(self.ds.settings.get("zero_optimization", {}), self.ds.path)
        if self.precision == "pure_bf16" and self.ds.zero_stage == 0:
            raise ConfigError(
                "--precision: pure_bf16 needs ZeRO stage 1, 2 or 3 (DeepSpeed keeps bf16 master weights "
                f"only in its ZeRO optimizers); {self.ds.path} is stage 0"
            )
        accum = self.ds.gradient_accumulation_steps
        if self.global_batch_size % (world_size * accum):
            raise ConfigError(
                f"--global-batch-size: {self.global_batch_size} is not divisible by ranks x "
                f"accumulation = {world_size} x {accum}"
            )
        if self.global_batch_size < 2:  # a multiple of the ranks: only a single rank can get here
            raise ConfigError("--global-batch-size: need at least 2 pairs for negatives")

    def embed_dim(self) -> int:
        """The width of the shared embedding: the preset's, or --pretrained-hf's projection_dim."""
        if self.pretrained_hf is None:
            return PRESETS[self.preset].embed_dim
        with open(Path(self.pretrained_hf) / "config.json") as f:
            return int(json.load(f).get("projection_dim", 512))  # transformers' CLIPConfig default

    def geometry(self) -> Geometry:
        """Image size, context length and vocabulary of the model: --pretrained-hf's when given, else the preset's."""
        from .model import model_geometry

        try:
            return model_geometry(self.preset, self.pretrained_hf)
        except ValueError as e:
            raise ConfigError(f"--pretrained-hf: {e}") from None

    def _check_memory(self, world_size: int) -> None:
        """Refuse sizes whose per-rank state alone cannot fit where it will live (the encoders and activations
        come on top, so passing says little; failing means the run cannot start)."""
        if self.loss == "neuclip" and self.npn_variant == "tailored":  # the MLP variant has a fixed size
            need = npn_state_bytes(self.npn_prototypes, self.embed_dim())
            _check_fits("--npn-prototypes", f"{self.npn_prototypes} prototypes", need, on_gpu=uses_cuda())
        if self.loss == "fastclip":
            samples = self.dataset_size or self.synthetic_samples
            need = fastclip_table_bytes(samples, world_size)
            _check_fits("--dataset-size", f"FastCLIP's u tables for {samples} samples", need, on_gpu=False)

    def _dataset_dir_values(self) -> dict:
        """--dataset-dir: a data set built by neuclip_ds (the embedded one) fills the unset data options."""
        if self.dataset_dir is None:
            return {}
        from .data.embedded import dataset_paths

        try:
            paths = dataset_paths(self.dataset_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"--dataset-dir: {e}") from None
        return {
            "train_data": self.train_data or paths["train"],
            "val_data": self.val_data or paths["val"],
            "tokenizer": self.tokenizer or paths["tokenizer"],
            "train_num_samples": self.train_num_samples or paths["num_train"],
            "dataset_size": self.dataset_size or paths["num_train"],
        }


def ds_config_file(value: str) -> Path:
    """--ds-config's file: a path to a DeepSpeed JSON, or the name of one shipped in the package (`zero2`, also
    `zero2.json`), so that an installed neuclip-train runs from any directory."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = SHIPPED_DS_CONFIGS / (value if value.endswith(".json") else f"{value}.json")
    if Path(value).name == value and shipped.is_file():
        return shipped
    raise ConfigError(f"--ds-config: file not found: {value} (a path, or a shipped name: {SHIPPED_DS_CONFIG_NAMES})")


def read_ds_config(value: str, grad_clip: float | None, accum_freq: int | None = None) -> DeepSpeedJSON:
    """The DeepSpeed JSON `value` names (`ds_config_file`) with --grad-clip and --accum-freq applied; ConfigError
    when it is missing or malformed."""
    path = str(ds_config_file(value))
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds-config: {path} is not valid JSON ({e})") from None
    zero = ds.get("zero_optimization", {}) if isinstance(ds, dict) else None
    if not isinstance(zero, dict):
        raise ConfigError(f"--ds-config: {path} must hold a JSON object with an object zero_optimization")
    stage = zero.get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ConfigError(f"--ds-config: unknown ZeRO stage {stage!r} in {path} (use 0, 1, 2 or 3)")
    accum = ds.get("gradient_accumulation_steps", 1) if accum_freq is None else accum_freq
    if not isinstance(accum, int) or accum <= 0:
        raise ConfigError(f"--ds-config: gradient_accumulation_steps must be a positive integer, got {accum!r}")
    clipping = ds.get("gradient_clipping", 0.0) if grad_clip is None else grad_clip
    if isinstance(clipping, bool) or not isinstance(clipping, (int, float)) or not 0 <= clipping < math.inf:
        raise ConfigError(f"--ds-config: gradient_clipping must be a number >= 0, got {clipping!r}")
    return DeepSpeedJSON(
        path=path,
        settings=ds,
        zero_stage=int(stage),
        gradient_accumulation_steps=accum,
        gradient_clipping=float(clipping),
    )


def _hf_tokenizer_dir(pretrained_hf: str | None) -> str | None:
    """--pretrained-hf's directory when it holds a tokenizer (as an OpenAI/OpenCLIP conversion or our export does)."""
    if pretrained_hf is None:
        return None
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    return pretrained_hf if any((Path(pretrained_hf) / f).is_file() for f in files) else None


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
        raise ConfigError(
            f"--train-data: {shards} readable shard(s) for {world_size} rank(s) x {max(1, workers)} "
            f"worker(s): give at least {readers} shards, fewer --workers, or --data-resampled"
        )


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


# bytes per parameter of each model state: (parameters, gradients, optimizer), the optimizer's being AdamW's two
# moments plus the fp32 master copy where the weights are half precision (ZeRO paper, section 3.1: 2 + 2 + 12)
_STATE_BYTES = {
    "fp32": (4, 4, 8),
    "bf16": (2, 2, 12),
    "fp16": (2, 2, 12),
    "pure_bf16": (2, 2, 4),  # bf16 moments, no master copy
}


def model_state_bytes(params: int, precision: str, zero_stage: int, world_size: int) -> int:
    """One rank's model states (parameters, gradients, AdamW) for `params` parameters; each is divided over the
    ranks from the stage that shards it on, as in DeepSpeed's estimators:
        bytes = P b_param / (N if stage >= 3) + P b_grad / (N if stage >= 2) + P b_optim / (N if stage >= 1)
    with (b_param, b_grad, b_optim) from _STATE_BYTES. Activations, buffers and fragmentation come on top."""
    b_param, b_grad, b_optim = _STATE_BYTES[precision]
    share = [world_size if zero_stage >= stage else 1 for stage in (3, 2, 1)]
    return round(params * (b_param / share[0] + b_grad / share[1] + b_optim / share[2]))


def fastclip_table_bytes(samples: int, world_size: int) -> int:
    """One rank's FastCLIP u tables (losses.ShardedLogTable, on the host): 2 tables of this rank's
    ceil(n / world_size) samples in fp32 (the engine's per-step snapshot holds the batch's rows only)."""
    return 2 * -(-samples // world_size) * _FP32


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


def format_bytes(n: int) -> str:
    """n bytes in the largest binary unit that keeps it >= 1 (KiB at least), one decimal."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


# -------------------------------------------------------------------------------------------------------------
# options: flags, types, choices (all from the TrainConfig fields)
# -------------------------------------------------------------------------------------------------------------
_OPTIONS = tuple(f for f in dataclasses.fields(TrainConfig) if "help" in f.metadata)


@dataclass(frozen=True)
class _Kind:
    """What an option's annotation says about its values."""

    type: type  # what a YAML or command-line value is converted to: int, float, bool or str
    optional: bool = False  # None (YAML null or ~) is a value
    choices: tuple = ()  # a Literal's values


def _kind(hint: Any) -> _Kind:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return _Kind(type(args[0]), choices=args)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        return dataclasses.replace(_kind(inner), optional=True)
    return _Kind(hint)


# get_type_hints: `from __future__ import annotations` leaves the fields' own types as strings
_HINTS = typing.get_type_hints(TrainConfig)
_KINDS = {f.name: _kind(_HINTS[f.name]) for f in _OPTIONS}
_ALIAS_OF = {alias: f.name for f in _OPTIONS for alias in f.metadata["aliases"]}
_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _one_of(choices: tuple) -> str:
    return " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuclip-train", description="Train CLIP with NeuCLIP (or FastCLIP/MBCL/SigLIP) under DeepSpeed."
    )
    parser.add_argument(
        "--config", help="YAML file of options (keys as the long flags, with _ or -); command-line flags override it"
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in _OPTIONS:
        name = f.metadata["group"]
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        group = groups[name]
        kind, text = _KINDS[f.name], f.metadata["help"]
        if f.default is not None:  # an unset (None) default is described by the help text itself
            text += f" (default {f.default})"
        flags = [_flag(name) for name in (f.name, *f.metadata["aliases"])]
        # default None everywhere: only what was given overrides the YAML file
        if kind.type is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        # values stay strings here and are converted with the YAML values (`_coerce`), choices checked by
        # validate(): one rule, one-line errors (argparse's own are a usage block)
        metavar = "{" + ",".join(kind.choices) + "}" if kind.choices else f.name.split("_")[-1].upper()
        group.add_argument(*flags, dest=f.name, default=None, metavar=metavar, help=text)
    for name in AMBIGUOUS:
        parser.add_argument(_flag(name), dest=f"ambiguous_{name}", default=None, help=argparse.SUPPRESS)
    # DeepSpeed's launcher passes --local_rank unless --no_local_rank is given
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank", None)
    for name, why in AMBIGUOUS.items():
        if args.pop(f"ambiguous_{name}") is not None:
            raise ConfigError(f"{_flag(name)}: {why}")
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
            if key in AMBIGUOUS:
                raise ConfigError(f"--config: {key!r} in {config_file} is {AMBIGUOUS[key]}")
            key = _ALIAS_OF.get(key, key)
            if key not in _KINDS:
                raise ConfigError(f"--config: unknown option {key!r} in {config_file}")
            values[key] = value
    given = {k: v for k, v in args.items() if v is not None}
    for a, b in EXCLUSIVE:  # the command line's choice replaces the file's
        if a in given or b in given:
            values.pop(b if a in given else a, None)
    values.update(given)
    # launched by `accelerate launch` with its DeepSpeed plugin: use the plugin's JSON unless one was given
    if "ds_config" not in values and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        values["ds_config"] = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    return TrainConfig(**{name: _coerce(name, value) for name, value in values.items()})


def _coerce(name: str, value: Any) -> Any:
    """A YAML or command-line value as the option's type; ConfigError naming the option and the type otherwise.
    Numbers may come as strings: YAML reads 1e-3 (no dot) as one, and the command line gives nothing else."""
    kind = _KINDS[name]
    if value is None and kind.optional:
        return None
    if isinstance(value, str):
        value = VALUE_ALIASES.get(name, {}).get(value, value)
    try:
        return _CONVERT[kind.type](value)
    except (TypeError, ValueError):
        hint = (
            " (YAML reads on/off/yes/no as true/false: quote it)"
            if kind.type is str and isinstance(value, bool)
            else ""
        )
        raise ConfigError(f"{_flag(name)}: expected {_EXPECTED[kind.type]}, got {value!r}{hint}") from None


def _scalar(value: Any) -> int | float | str:
    """value itself if it is a number or a string; bool (an int to Python) and lists, mappings, null are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return value


def _to_int(value: Any) -> int:
    value = _scalar(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)  # exact, also past float precision
    number = float(value)  # 1e6, 100.0
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def _to_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(value)
    return value


_CONVERT = {
    int: _to_int,
    float: lambda v: float(_scalar(v)),
    bool: _to_bool,
    str: lambda v: str(_scalar(v)),
}  # a number where a name goes (output_dir: 2024) is that name
