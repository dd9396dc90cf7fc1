"""Quality parity against OpenCLIP's trainer (issue 12, item 0): `open_clip_train.main` and neuclip_ds train the
same model size on the same webdataset shards with the same batch, schedule, optimizer and seeds, and both are
scored by ONE protocol, `neuclip_ds.evaluate.evaluate` (retrieval R@1/5/10 both ways and zero-shot top-1/top-5 per
attribute on the val split of the embedded digits data set).

    make openclip-venv && make data                     # .venv-openclip (torch + torchvision + open_clip_torch
                                                        # [training] + neuclip_ds), data/digits
    .venv-openclip/bin/python benchmarks/vs_openclip_quality.py --quick     # 1 seed, 1 epoch (prints only)
    .venv-openclip/bin/python benchmarks/vs_openclip_quality.py             # tiny, 4 epochs, seeds 0,1,2, mbcl
    .venv-openclip/bin/python benchmarks/vs_openclip_quality.py --losses mbcl,neuclip \\
        --extra-neuclip-args "--rho 1.5"          # appended to every neuclip-train command (later flags win)
    .venv-openclip/bin/python benchmarks/vs_openclip_quality.py --same-init # both start from one init per seed

Both trainers run in this interpreter's venv (same torch), one process each on the CPU (`--threads`), one after
the other per seed: open_clip, then neuclip_ds with each loss of `--losses`. Run directories go to `--runs`
(default runs/vs_openclip_quality, wiped per run); the raw numbers to `<runs>/results.json`; the markdown tables
to `--out` (not with --quick) and stdout: per trainer/loss and seed (final tau, image->text and text->image R@1,
zero-shot top-1 per attribute and their mean, each trainer's own training loss over the last 10 steps, train
wall time), mean ± std over seeds, and the paired difference neuclip_ds − open_clip per seed with mean ± std.

How each setting is matched
- Model. neuclip_ds builds HF CLIP towers from the preset (neuclip_ds/presets.py); open_clip gets a model config
  JSON of the same sizes written at run time into a temp dir and registered with `open_clip.add_model_config`
  before `open_clip_train.main.main(argv)` runs (in a subprocess: this script with `--_run-openclip`). tiny:
  embed 64; vision 32 px, patch 8, width 128 x 2 layers, 4 heads (open_clip: head_width 32), mlp ratio 2;
  text width 128 x 2 layers, 4 heads, mlp ratio 4, context 32, vocabulary = the data set's tokenizer (268).
  Both towers are pre-LN transformers with exact GELU (quick_gelu off), LayerNorm eps 1e-5, biased attention and
  MLP, no-bias patch embedding and projections, class-token pooling with ln_post/post_layernorm, EOS pooling after
  ln_final/final_layer_norm: the parameter counts are equal and checked at run time.
- Tokenizer and pooling. open_clip's text_cfg `hf_tokenizer_name` points at a copy of the data set's HF tokenizer
  (data/digits/tokenizer) to which a TemplateProcessing post-processor `<|startoftext|> $A <|endoftext|>` was
  added (`neuclip_ds.export._export_tokenizer`, as `neuclip-export` writes it): the data set's tokenizer.json adds
  no special tokens (neuclip_ds's TextTokenizer adds bos/eos itself), so without it open_clip's HFTokenizer would
  give sequences with no EOS. open_clip 2.26's text tower pools with `pool_type` 'argmax' (the position of the
  largest token id; 2.26 has no 'eos' pool type). That is the EOS here because this tokenizer puts
  `<|endoftext|>` at the largest id (267; bos 266, pad `<pad>` = 1): the run checks this, and that open_clip's
  token ids equal TextTokenizer's (bos + tokens + eos + pad 1, truncated with eos kept last) on every train and
  val caption and every zero-shot prompt.
- Compatibility. `make openclip-venv` resolves open_clip 2.26.1, older than this venv's transformers 5 and
  webdataset 1.0; `openclip_compat` adds two shims (only when needed; neither changes what open_clip computes):
  `batch_encode_plus` (removed in transformers 5, called by open_clip's HFTokenizer) as the tokenizer's
  `__call__`, and `eof_value=None` for open_clip's webdataset tar expander (its `group_by_keys_nothrow` fails on
  webdataset 1.0's end-of-shard marker with KeyError 'fname').
- Image normalization. Both use the OpenAI CLIP mean/std (neuclip_ds CLIP_MEAN/CLIP_STD = open_clip's
  OPENAI_DATASET_MEAN/STD); checked at run time on open_clip's train transform. Evaluation runs
  `neuclip_ds.evaluate`'s own eval transform (bicubic resize of the shorter side + center crop) for both models.
- Train augmentation. Both: RandomResizedCrop to 32 px, scale (0.9, 1.0), ratio (3/4, 4/3), bicubic, no other
  augmentation (open_clip's default AugmentationCfg; checked at run time). Remaining difference: torchvision
  crops then resizes (PIL), neuclip_ds resizes with PIL's `box=` argument (the filter may read pixels just outside
  the box at its border), and the crop RNGs differ (torch RNG in open_clip's loader worker, Python RNG seeded by
  (seed, epoch, rank, worker) in neuclip_ds).
- Data. The same shards (`dataset_paths(--dataset-dir)["train"]`, e.g. data/digits/train/{00000..00007}.tar),
  `--dataset-type webdataset`, not resampled. Steps per epoch: neuclip_ds drops the last partial batch
  (8,000 // 128 = 62 steps); open_clip rounds up and would refill a 63rd batch from a second pass, so it gets
  `--train-num-samples` = 62 x 128 = 7,936: both take 62 full batches per epoch (248 steps over 4 epochs), the
  64 left-over samples of an epoch differ. Checked from both logs. open_clip `--workers 1`, neuclip_ds
  `--workers 0` (its default; its data order does not depend on that).
- Optimizer. AdamW on both, lr `--lr`, weight decay `--wd` on >= 2-dim weights only (open_clip excludes ndim < 2
  and names with bn/ln/bias/logit_scale; neuclip_ds decays ndim >= 2 and keeps the temperature in a group of its
  own: the same elements, checked at run time), betas (0.9, 0.98), eps 1e-6 passed explicitly on both sides
  (open_clip's defaults depend on the model name: "vit" in it gives these, any other name 0.999 / 1e-8).
- Schedule. Linear warmup over `--warmup` steps then cosine to 0 over the run, both as lr * (step+1)/warmup and
  0.5 (1 + cos(pi (step - warmup) / (total - warmup))), stepped once per optimizer step (the run compares the two
  logged lr sequences).
- Clipping. Global gradient norm 1.0 over all parameters (open_clip `--grad-clip-norm 1.0`; neuclip_ds
  `--grad-clip 1.0`, which sets the DeepSpeed JSON's gradient_clipping, already 1.0 in ds_configs/zero2.json).
- Precision, parallelism. fp32 on both, one process; neuclip_ds 1 rank, ZeRO-2 (`--ds-config`), global batch =
  open_clip's batch. neuclip_ds gets `--text-padding max_length` (the text tower on all 32 positions, as open_clip;
  `longest` is mathematically the same, only its rounding differs).
- Temperature. open_clip stores logit_scale = log(1/tau), initialized to log(1/0.07), in its no-decay group at the
  encoders' lr and schedule, and clamps the parameter to [0, log 100] (tau in [0.01, 1]) after every step.
  neuclip_ds gets `--init-tau 0.07 --tau-min 0.01 --tau-max 1.0 --tau-param log --lr-tau <lr> --lr-tau-schedule
  cosine`: the same parameter, its own no-decay AdamW group at the same lr and schedule, the range kept on the
  stored parameter after each step (neuclip_ds's TemperatureKeeper) - i.e. matched. Every neuclip_ds command
  line is parsed by neuclip_ds itself and compared with the open_clip settings (`differences_from_openclip`): what
  `--extra-neuclip-args` changes (e.g. `--lr-tau`, `--tau-param raw`) is listed under the tables. Reported: final
  tau = 1 / exp(logit_scale) of each checkpoint (after the last update; the results JSON also has the tau each
  trainer used in its last step, e.g. metrics.jsonl's last `tau`).
- Loss. open_clip: ClipLoss (1 process). neuclip_ds `--loss mbcl` is the same loss (mean of the two
  cross-entropies); other `--losses` (neuclip, fastclip) take their loss-specific settings (rho, eps, NPN /
  FastCLIP options) from configs/tiny-neuclip.yaml or neuclip_ds's defaults, passed explicitly.
- Evaluation. open_clip's `logs/<name>/checkpoints/epoch_N.pt` is loaded into the registered open_clip model and
  wrapped in `OpenCLIPAdapter` (encode_image / encode_text(input_ids, attention_mask) -> L2-normalized features,
  image_size, context_length; evaluation trims text padding to the batch's longest caption, the adapter pads back
  to the full context with the pad id, as open_clip trained). neuclip_ds is re-evaluated from its checkpoint
  (ZeRO shards consolidated) with the same call and compared with the eval_results.json its training wrote.

Same seed, same shards: what still differs between the two runs of one seed (sources of randomness)
- initialization: open_clip's (vision: class/position embeddings and projection N(0, 1/width), patch conv and
  blocks with torch's defaults; text: normals with width-based std) vs HF CLIPModel's `_init_weights`, and
  different RNG streams even where the schemes agree. `--same-init` removes this one: each seed's open_clip
  initialization is saved for open_clip's `--pretrained FILE` and converted (`openclip_to_hf_state`: q/k/v split
  out of the fused in_proj, projections transposed) into a CLIPModel directory for neuclip_ds's `--pretrained-hf`;
  the run checks that both models give the same image and text features before training;
- shard order: open_clip's detshuffle2 (seeded by seed and epoch) vs neuclip_ds's per-epoch permutation (seeded by
  seed and epoch): the same seed gives different orders;
- sample order: open_clip's sample shuffle buffer (5,000, webdataset's `shuffle`) is seeded from the clock and
  pid, not from --seed, so an open_clip run is not reproducible; neuclip_ds's buffer (1,000) is seeded;
- crop parameters (see augmentation).
So the "paired" difference pairs runs by seed only; its spread is the spread of two independent runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import ROOT, markdown_table, mean_std, report, train

from neuclip_ds.launch import cpu_env, run_command

RUN_OPENCLIP = "--_run-openclip"  # internal: this script as open_clip's launcher
OPENCLIP_NAME = "run"
LOSSES = ("mbcl", "neuclip", "fastclip")
# settings of the non-MBCL losses, taken from `make train`'s config (else neuclip_ds's defaults)
LOSS_KEYS = {
    "mbcl": (),
    "neuclip": (
        "rho",
        "normalizer_eps",
        "npn_prototypes",
        "npn_inner_steps",
        "npn_restart_every",
        "npn_lr",
        "npn_variant",
        "npn_update",
    ),
    "fastclip": ("rho", "normalizer_eps", "fastclip_gamma_min", "fastclip_gamma_decay_epochs"),
}
ADAM = {"beta1": 0.9, "beta2": 0.98, "eps": 1e-6}
TAU = {"init": 0.07, "min": 0.01, "max": 1.0}
GRAD_CLIP = 1.0
LAST_STEPS = 10  # training loss: mean of the last steps
OPENCLIP_LINE = re.compile(
    r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \(\s*\d+%\)\].*?LR: ([0-9.eE+-]+) "
    r"Logit Scale: ([0-9.eE+-]+) (?:\w+_loss|Loss): ([0-9.eE+naif-]+)"
)


# ------------------------------------------------------------------------------------------------------------
# pure helpers (tests/test_vs_openclip_quality.py)
# ------------------------------------------------------------------------------------------------------------
def openclip_model_config(preset, *, vocab_size: int, tokenizer_dir: str, pad_id: int) -> dict:
    """open_clip model config (the JSON of `add_model_config`) of a neuclip_ds preset (presets.Preset)."""
    if preset.vision_width % preset.vision_heads:
        raise ValueError(
            f"{preset.name}: vision width {preset.vision_width} not divisible by {preset.vision_heads} heads"
        )
    if preset.hidden_act != "gelu":
        raise ValueError(f"{preset.name}: hidden_act {preset.hidden_act!r} has no open_clip equivalent here")
    return {
        "embed_dim": preset.embed_dim,
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": preset.image_size,
            "patch_size": preset.patch_size,
            "width": preset.vision_width,
            "layers": preset.vision_layers,
            "head_width": preset.vision_width // preset.vision_heads,
            "mlp_ratio": preset.vision_mlp_ratio,
        },
        "text_cfg": {
            "context_length": preset.context_length,
            "vocab_size": int(vocab_size),
            "width": preset.text_width,
            "heads": preset.text_heads,
            "layers": preset.text_layers,
            "mlp_ratio": 4.0,
            "hf_tokenizer_name": str(tokenizer_dir),
            "pad_id": int(pad_id),
            "pool_type": "argmax",
        },
    }


def steps_per_epoch(num_train: int, batch: int) -> int:
    """neuclip_ds's steps per epoch (1 rank, drop_last); open_clip gets exactly this many with
    --train-num-samples = steps x batch."""
    if num_train < batch:
        raise ValueError(f"--batch {batch}: larger than the {num_train} training samples")
    return num_train // batch


def loss_args(loss: str, yaml_config: dict) -> list[str]:
    """neuclip-train flags of the loss-specific settings: `make train`'s config value, else the default."""
    from neuclip_ds.config import TrainConfig

    defaults = TrainConfig()
    out = ["--loss", loss]
    for key in LOSS_KEYS[loss]:
        value = yaml_config.get(key, getattr(defaults, key))
        out += ["--" + key.replace("_", "-"), str(value)]
    return out


def temperature_args(lr: float) -> list[str]:
    """neuclip-train flags that put its temperature where open_clip's is: init 0.07, range [0.01, 1], stored as
    log(1/tau) (open_clip's logit_scale) with the encoders' lr and schedule."""
    return (
        f"--init-tau {TAU['init']} --tau-min {TAU['min']} --tau-max {TAU['max']} --tau-param log --lr-tau {lr}"
        " --lr-tau-schedule cosine"
    ).split()


def neuclip_args(
    *,
    preset: str,
    dataset_dir: str,
    loss: str,
    yaml_config: dict,
    ds_config: str,
    batch: int,
    epochs: int,
    lr: float,
    wd: float,
    warmup: int,
    seed: int,
    extra: str = "",
) -> list[str]:
    """The neuclip-train command line (without --output-dir/--report-to) of one run."""
    inputs = ["--preset", preset, "--dataset-dir", dataset_dir, "--ds-config", ds_config]
    training = (
        f"--precision fp32 --global-batch-size {batch} --epochs {epochs} --lr {lr} --wd {wd} --warmup {warmup}"
        f" --beta1 {ADAM['beta1']} --beta2 {ADAM['beta2']} --adam-eps {ADAM['eps']} --grad-clip {GRAD_CLIP}"
    ).split()
    rest = f"--seed {seed} --workers 0 --text-padding max_length --save-every 0".split()
    return [*inputs, *loss_args(loss, yaml_config), *training, *temperature_args(lr), *rest, *shlex.split(extra)]


def differences_from_openclip(
    cfg, *, batch: int, epochs: int, lr: float, wd: float, warmup: int, seed: int
) -> list[str]:
    """What a parsed neuclip_ds TrainConfig sets differently from the open_clip run of the same benchmark
    (e.g. through --extra-neuclip-args, or a neuclip_ds without the log temperature); [] when all match."""
    expected = {
        "global_batch_size": batch,
        "epochs": epochs,
        "lr": lr,
        "wd": wd,
        "warmup": warmup,
        "seed": seed,
        "beta1": ADAM["beta1"],
        "beta2": ADAM["beta2"],
        "adam_eps": ADAM["eps"],
        "grad_clip": GRAD_CLIP,
        "precision": "fp32",
        "init_tau": TAU["init"],
        "tau_min": TAU["min"],
        "tau_max": TAU["max"],
        "tau_param": "log",
        "lr_tau_schedule": "cosine",
    }
    out = []
    for key, want in expected.items():
        flag = "--" + key.replace("_", "-")
        got = getattr(cfg, key)
        same = math.isclose(got, want, rel_tol=1e-12) if isinstance(want, float) and got is not None else got == want
        if not same:
            out.append(f"{flag} {got} (open_clip: {want})")
    tau_lr = cfg.lr_tau
    if tau_lr is not None and not math.isclose(tau_lr, cfg.lr, rel_tol=1e-12):
        out.append(f"--lr-tau {tau_lr} (open_clip: the encoders' lr {cfg.lr})")
    return out


def openclip_args(
    *,
    model: str,
    train_data: str,
    num_samples: int,
    batch: int,
    epochs: int,
    lr: float,
    wd: float,
    warmup: int,
    seed: int,
    logs: str,
) -> list[str]:
    """The open_clip_train.main command line of one run."""
    training = (
        f"--dataset-type webdataset --train-num-samples {num_samples} --batch-size {batch} --epochs {epochs}"
        f" --lr {lr} --wd {wd} --warmup {warmup} --lr-scheduler cosine"
        f" --beta1 {ADAM['beta1']} --beta2 {ADAM['beta2']} --eps {ADAM['eps']} --grad-clip-norm {GRAD_CLIP}"
        f" --precision fp32 --seed {seed} --workers 1 --accum-freq 1"
        " --save-frequency 0 --zeroshot-frequency 0 --val-frequency 0 --log-every-n-steps 1"
    ).split()
    inputs = ["--model", model, "--train-data", train_data, "--logs", logs, "--name", OPENCLIP_NAME]
    return [*inputs, *training, "--report-to", ""]


def parse_openclip_log(text: str) -> list[dict]:
    """One dict per logged open_clip step (--log-every-n-steps 1): epoch, samples (seen in the epoch so far),
    samples_per_epoch, lr, logit_scale (exp'd, as logged: 1/tau used in that step), loss."""
    rows = []
    for ep, seen, total, lr, scale, loss in OPENCLIP_LINE.findall(text):
        rows.append(
            {
                "epoch": int(ep),
                "samples": int(seen),
                "samples_per_epoch": int(total),
                "lr": float(lr),
                "logit_scale": float(scale),
                "loss": float(loss),
            }
        )
    return rows


def lr_mismatch(openclip_lrs: list[float], neuclip_lrs_after: list[float], base_lr: float) -> float:
    """Largest |difference| / base lr between the lr each trainer used at each step. open_clip logs the lr of
    the step; neuclip_ds's metrics.jsonl logs the lr after the step's scheduler update (= the next step's), so
    its step i used row i-1's (step 0: lr x 1/warmup, from open_clip's own row)."""
    n = min(len(openclip_lrs), len(neuclip_lrs_after) + 1)
    if n < 2:
        return float("nan")
    ours = neuclip_lrs_after[: n - 1]
    return max(abs(a - b) for a, b in zip(openclip_lrs[1:n], ours)) / base_lr


_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def openclip_to_hf_state(state: dict) -> dict:
    """An open_clip CLIP state dict (ViT image tower, built-in text transformer) as a transformers CLIPModel state
    dict: fused attention in_proj split into q/k/v, [width, embed] projections transposed into Linear weights,
    everything else renamed. Every open_clip tensor is used exactly once (a KeyError/ValueError otherwise)."""
    out, used = {}, set()

    def take(key):
        used.add(key)
        return state[key]

    def blocks(src: str, dst: str):
        layers = sorted({int(k[len(src) :].split(".")[0]) for k in state if k.startswith(src)})
        for i in layers:
            a, b = f"{src}{i}.", f"{dst}{i}."
            for name, tensor in (("weight", take(a + "attn.in_proj_weight")), ("bias", take(a + "attn.in_proj_bias"))):
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    out[f"{b}self_attn.{proj}.{name}"] = part.clone()
            for old, new in _BLOCK_RENAMES.items():
                for name in ("weight", "bias"):
                    out[f"{b}{new}.{name}"] = take(f"{a}{old}.{name}")

    out["text_model.embeddings.token_embedding.weight"] = take("token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
    blocks("transformer.resblocks.", "text_model.encoder.layers.")
    for name in ("weight", "bias"):
        out[f"text_model.final_layer_norm.{name}"] = take(f"ln_final.{name}")
        out[f"vision_model.pre_layrnorm.{name}"] = take(f"visual.ln_pre.{name}")
        out[f"vision_model.post_layernorm.{name}"] = take(f"visual.ln_post.{name}")
    out["text_projection.weight"] = take("text_projection").t().contiguous()
    out["vision_model.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    out["vision_model.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    blocks("visual.transformer.resblocks.", "vision_model.encoder.layers.")
    out["visual_projection.weight"] = take("visual.proj").t().contiguous()
    out["logit_scale"] = take("logit_scale").reshape(())
    left = sorted(k for k in state if k not in used and k != "attn_mask")
    if left:
        raise ValueError(f"open_clip tensors without a CLIPModel counterpart: {left[:5]}")
    return out


def neuclip_model(preset, text_tok):
    """The preset as neuclip_ds builds it for the data set's tokenizer (vocabulary and special-token ids)."""
    from neuclip_ds.model import build_model

    return build_model(
        preset.name,
        vocab_size=text_tok.vocab_size,
        eos_token_id=text_tok.eos_token_id,
        bos_token_id=text_tok.bos_token_id,
        pad_token_id=text_tok.pad_token_id,
    )


def write_shared_init(model_name: str, preset, text_tok, seed: int, out_dir: Path) -> tuple[Path, Path, float]:
    """One initialization for both trainers: open_clip's own init of `model_name` under torch.manual_seed(seed)
    (what open_clip_train draws for that seed), saved as an open_clip checkpoint (its `--pretrained FILE`) and as
    a transformers CLIPModel directory (neuclip_ds's `--pretrained-hf DIR`) built from neuclip_ds's preset config.
    Returns (checkpoint, HF directory, largest |difference| of the two models' image and text features on a
    batch) - the conversion is checked, not assumed."""
    import open_clip
    from transformers import CLIPModel

    from neuclip_ds.model import load_hf_clip

    torch.manual_seed(seed)
    oc_model = open_clip.create_model(model_name, precision="fp32", device="cpu").eval()
    state = {k: v.detach().clone() for k, v in oc_model.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "open_clip_init.pt"
    torch.save(state, ckpt)
    ours = neuclip_model(preset, text_tok)
    hf = CLIPModel(ours.hf_config())
    missing, unexpected = hf.load_state_dict(openclip_to_hf_state(state), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"shared init: CLIPModel keys missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf_dir = out_dir / "hf_init"
    hf.save_pretrained(hf_dir)
    loaded = load_hf_clip(hf_dir).eval()
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(8, 3, preset.image_size, preset.image_size, generator=g)
    ids = text_tok([f"a photo number {i}" for i in range(8)])["input_ids"]
    with torch.no_grad():
        diff = max(
            float((loaded.encode_image(pixels) - F.normalize(oc_model.encode_image(pixels), dim=-1)).abs().max()),
            float((loaded.encode_text(ids) - F.normalize(oc_model.encode_text(ids), dim=-1)).abs().max()),
        )
    if diff > 1e-4:
        raise SystemExit(f"shared init: CLIPModel features differ from open_clip's by {diff:.3g}")
    return ckpt, hf_dir, diff


def pad_to_context(input_ids: torch.Tensor, context_length: int, pad_id: int) -> torch.Tensor:
    """Right-pad [b, n] token ids to [b, context_length] with pad_id (n <= context_length)."""
    n = input_ids.shape[1]
    if n > context_length:
        raise ValueError(f"{n} tokens > context length {context_length}")
    return F.pad(input_ids, (0, context_length - n), value=pad_id) if n < context_length else input_ids


class OpenCLIPAdapter(torch.nn.Module):
    """An open_clip CLIP model with the interface `neuclip_ds.evaluate.evaluate` uses: encode_image(pixels),
    encode_text(input_ids, attention_mask) -> L2-normalized features, image_size, context_length. The model is held
    as `.clip`, not `.module` (evaluate unwraps `.module`). Text comes trimmed to the batch's longest caption;
    open_clip adds all context_length position embeddings, so the ids are padded back with the pad id (what
    open_clip trained on; causal attention and EOS pooling make the pad positions irrelevant anyway)."""

    def __init__(self, clip, *, image_size: int, context_length: int, pad_id: int):
        super().__init__()
        self.clip = clip
        self._image_size, self._context_length, self.pad_id = int(image_size), int(context_length), int(pad_id)

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def context_length(self) -> int:
        return self._context_length

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(pixel_values), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = pad_to_context(input_ids, self._context_length, self.pad_id)
        return F.normalize(self.clip.encode_text(ids), dim=-1)


def metric_columns(attributes: list[str]) -> list[tuple[str, str, float]]:
    """(column title, results key, scale) of the tables: tau, R@1 both ways, zero-shot top-1 per attribute + mean."""
    cols = [
        ("final τ", "tau", 1.0),
        ("I→T R@1", "retrieval/image_to_text_R@1", 100.0),
        ("T→I R@1", "retrieval/text_to_image_R@1", 100.0),
    ]
    cols += [(f"zs {a}", f"zeroshot/{a}/top1", 100.0) for a in attributes]
    cols.append(("zs mean", "zeroshot/mean/top1", 100.0))
    return cols


def _value(run: dict, key: str, scale: float):
    v = run["tau"] if key == "tau" else run["eval"].get(key)
    return None if v is None else scale * float(v)


def _fmt(v, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def tables(runs: list[dict], attributes: list[str]) -> list[str]:
    """Markdown: per run, mean ± std per trainer, paired difference per neuclip_ds loss and seed.
    A run: {"trainer": "open_clip" | "neuclip_ds", "loss", "seed", "tau", "eval": {evaluate's keys},
    "train_loss", "wall_s"}."""
    cols = metric_columns(attributes)
    digits = {"tau": 4}

    def label(r):
        return "open_clip" if r["trainer"] == "open_clip" else f"neuclip_ds {r['loss']}"

    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(label(r), []).append(r)
    lines = [
        "Per run (metrics in %, τ as is; train loss = each trainer's own objective, mean of the last "
        f"{LAST_STEPS} steps; train s = wall time of the trainer's process, neuclip_ds's includes its own final "
        "evaluation):",
        "",
    ]
    lines += markdown_table(
        ["trainer", "seed", *[c[0] for c in cols], "train loss", "train s"],
        [
            [
                label(r),
                r["seed"],
                *[_fmt(_value(r, k, s), digits.get(k, 2)) for _, k, s in cols],
                _fmt(r.get("train_loss"), 4),
                _fmt(r.get("wall_s"), 0),
            ]
            for r in runs
        ],
    )
    lines += ["", "Mean ± std over seeds:", ""]
    lines += markdown_table(
        ["trainer", "seeds", *[c[0] for c in cols]],
        [
            [name, len(rs), *[mean_std([_value(r, k, s) for r in rs], digits=digits.get(k, 2)) for _, k, s in cols]]
            for name, rs in groups.items()
        ],
    )
    base = {r["seed"]: r for r in groups.get("open_clip", [])}
    for name, rs in groups.items():
        if name == "open_clip":
            continue
        paired = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
        if not paired:
            continue
        rows = []
        diffs: dict[str, list[float]] = {k: [] for _, k, _ in cols}
        for r, b in paired:
            row = [r["seed"]]
            for _, k, s in cols:
                a, c = _value(r, k, s), _value(b, k, s)
                d = None if a is None or c is None else a - c
                if d is not None:
                    diffs[k].append(d)
                row.append(_fmt(d, digits.get(k, 2)))
            rows.append(row)
        rows.append(["mean ± std", *[mean_std(diffs[k], digits=digits.get(k, 2)) for _, k, _ in cols]])
        lines += ["", f"Paired difference {name} − open_clip (same seed; points of %, τ as is):", ""]
        lines += markdown_table(["seed", *[c[0] for c in cols]], rows)
    return lines


# ------------------------------------------------------------------------------------------------------------
# open_clip side
# ------------------------------------------------------------------------------------------------------------
def openclip_compat() -> list[str]:
    """Shims for open_clip 2.26 (what `make openclip-venv` resolves) on this venv's newer libraries; returns what
    was patched. Neither changes what open_clip computes:
    - its HFTokenizer calls `batch_encode_plus`, which transformers 5 removed: added back as the tokenizer's
      `__call__` (same arguments for a list of texts);
    - its webdataset reader (`tarfile_to_samples_nothrow` -> `group_by_keys_nothrow`) predates webdataset 1.0's
      end-of-shard marker `{}` (it raises KeyError 'fname' on it): its tar expander gets `eof_value=None`, the
      pre-1.0 behaviour (samples of the next shard start a new sample anyway: their keys differ)."""
    patched = []
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
        PreTrainedTokenizerBase.batch_encode_plus = lambda self, texts, **kw: self(list(texts), **kw)
        patched.append("transformers: batch_encode_plus = __call__")
    import inspect

    import open_clip_train.data as oc_data

    expander = oc_data.tar_file_expander
    if "eof_value" in inspect.signature(expander).parameters and "filesample == {}" not in inspect.getsource(
        oc_data.group_by_keys_nothrow
    ):
        oc_data.tar_file_expander = functools.partial(expander, eof_value=None)
        patched.append("open_clip_train.data: tar_file_expander(eof_value=None)")
    return patched


def run_openclip_main(config_path: str, argv: list[str]) -> int:
    """`--_run-openclip CONFIG -- ARGV`: register the model config, then open_clip's own trainer."""
    openclip_compat()
    import open_clip
    from open_clip_train.main import main as openclip_main

    open_clip.add_model_config(config_path)
    rc = openclip_main(argv)
    return 0 if rc is None else int(rc != 0 and 1)


def write_openclip_model(tmp: Path, preset, text_tok, tokenizer_src: str) -> tuple[str, Path, dict]:
    """(model name, config path, config) of the preset as an open_clip model, with a tokenizer that adds bos/eos."""
    from neuclip_ds.export import _export_tokenizer

    tok_dir = tmp / "tokenizer"
    _export_tokenizer(tokenizer_src, tok_dir, context_length=preset.context_length)
    cfg = openclip_model_config(
        preset, vocab_size=text_tok.vocab_size, tokenizer_dir=str(tok_dir), pad_id=text_tok.pad_token_id
    )
    name = f"neuclip-{preset.name}-parity"
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=2))
    return name, path, cfg


def read_captions(shards: str) -> list[str]:
    """Every caption (.txt) of a shard pattern."""
    import tarfile

    from neuclip_ds.data.shards import expand_shards

    out = []
    for shard in expand_shards(shards)[0]:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    out.append(tar.extractfile(member).read().decode("utf-8").strip())
    return out


def check_setup(model_name: str, text_tok, preset, paths: dict, dataset_dir: str) -> list[str]:
    """The run-time checks of the docstring (tokens, pooling position, transforms, parameter count); raises
    SystemExit on a mismatch, returns one line per check."""
    import open_clip
    from torchvision import transforms as T

    from neuclip_ds.data.embedded import load_classnames, load_templates
    from neuclip_ds.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform

    notes = []
    # tokens: open_clip's tokenizer = TextTokenizer on all captions and prompts; argmax = eos position
    oc_tok = open_clip.get_tokenizer(model_name)
    texts = read_captions(paths["train"]) + read_captions(paths["val"])
    classnames, templates = load_classnames(dataset_dir), load_templates(dataset_dir)
    texts += [t.format(c) for a, names in classnames.items() for c in names for t in templates.get(a, [])]
    if text_tok.eos_token_id != text_tok.vocab_size - 1 or text_tok.pad_token_id >= text_tok.eos_token_id:
        raise SystemExit(
            f"tokenizer: eos id {text_tok.eos_token_id} is not the largest id "
            f"({text_tok.vocab_size - 1}): open_clip's argmax pooling would miss it"
        )
    for a in range(0, len(texts), 1024):
        chunk = texts[a : a + 1024]
        ours = text_tok(chunk)["input_ids"]
        theirs = oc_tok(chunk)
        if not torch.equal(ours, theirs):
            bad = int((ours != theirs).any(dim=1).nonzero()[0])
            raise SystemExit(
                f"tokenizer: open_clip's ids differ from TextTokenizer's for {chunk[bad]!r}:\n"
                f"{theirs[bad].tolist()}\n{ours[bad].tolist()}"
            )
        eos_pos = (ours == text_tok.eos_token_id).int().argmax(dim=1)
        if not torch.equal(theirs.argmax(dim=1), eos_pos):
            raise SystemExit("tokenizer: open_clip's argmax pooling position is not the eos position")
    notes.append(
        f"token ids: open_clip's HFTokenizer = neuclip_ds's TextTokenizer on all {len(texts)} train/val "
        f"captions and zero-shot prompts; argmax pooling position = eos position (eos id "
        f"{text_tok.eos_token_id} = largest id)"
    )
    # transforms
    model, preprocess_train, _ = open_clip.create_model_and_transforms(model_name, precision="fp32", device="cpu")
    steps = list(getattr(preprocess_train, "transforms", []))
    crops = [t for t in steps if isinstance(t, T.RandomResizedCrop)]
    norms = [t for t in steps if isinstance(t, T.Normalize)]
    ours_t = ImageTransform(preset.image_size, train=True)
    other = [
        type(t).__name__
        for t in steps
        if not isinstance(t, (T.RandomResizedCrop, T.Normalize, T.ToTensor))
        and getattr(t, "__name__", "") != "_convert_to_rgb"
    ]
    if len(crops) != 1 or len(norms) != 1 or other:
        raise SystemExit(f"open_clip train transform is not crop + to-tensor + normalize: {preprocess_train}")
    crop, norm = crops[0], norms[0]
    same = (
        tuple(crop.size) == (preset.image_size,) * 2
        and tuple(crop.scale) == tuple(ours_t.scale)
        and all(math.isclose(a, b) for a, b in zip(crop.ratio, ours_t.ratio))
        and crop.interpolation == T.InterpolationMode.BICUBIC
        and tuple(norm.mean) == tuple(CLIP_MEAN)
        and tuple(norm.std) == tuple(CLIP_STD)
    )
    if not same:
        raise SystemExit(f"open_clip train transform differs from neuclip_ds's: {preprocess_train}")
    notes.append(
        f"train transform: open_clip RandomResizedCrop({preset.image_size}, scale={tuple(crop.scale)}, "
        f"ratio=({crop.ratio[0]:.3f}, {crop.ratio[1]:.3f}), bicubic) + Normalize(CLIP mean/std) = "
        f"neuclip_ds's"
    )
    # parameter count
    ours_m = neuclip_model(preset, text_tok)
    n_theirs = sum(p.numel() for p in model.parameters())
    n_ours = sum(p.numel() for p in ours_m.parameters())
    if n_theirs != n_ours:
        raise SystemExit(f"model size: open_clip {n_theirs} parameters, neuclip_ds {n_ours}")
    notes.append(f"parameters: {n_ours:,} in both models (towers + 1 temperature parameter)")
    # weight-decay groups: open_clip_train/main.py's rule vs neuclip_ds's own optimizer builder
    from neuclip_ds.config import TrainConfig
    from neuclip_ds.engine import build_optimizer

    def excluded(n, p):  # open_clip_train/main.py: no weight decay for these
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    # (element counts: open_clip fuses q/k/v into one in_proj tensor and stores projections transposed)
    decayed_theirs = sum(p.numel() for n, p in model.named_parameters() if not excluded(n, p))
    groups = build_optimizer(ours_m, TrainConfig(wd=0.1)).param_groups
    decayed_ours = sum(p.numel() for g in groups if g["weight_decay"] > 0 for p in g["params"])
    if decayed_ours != decayed_theirs:
        raise SystemExit(f"weight decay: open_clip decays {decayed_theirs} elements, neuclip_ds {decayed_ours}")
    notes.append(
        f"weight decay on the same {decayed_ours:,} elements (the >= 2-dim weights; none on gains, biases,"
        f" class embedding, temperature) on both sides"
    )
    return notes


def train_openclip(config_path: Path, argv: list[str], logs: Path, threads: int) -> tuple[list[dict], Path, float]:
    """(logged steps, final checkpoint, wall seconds) of one open_clip run."""
    shutil.rmtree(logs / OPENCLIP_NAME, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), RUN_OPENCLIP, str(config_path), "--", *argv]
    t0 = time.time()
    proc = run_command(cmd, cwd=ROOT, env=cpu_env(threads, hide_cuda=True), timeout=None, check=False)
    wall = time.time() - t0
    log = logs / OPENCLIP_NAME / "out.log"
    text = log.read_text() if log.is_file() else ""
    (logs / "subprocess.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"open_clip failed (rc {proc.returncode}):\n{(text or proc.stdout + proc.stderr)[-3000:]}")
    ckpts = sorted((logs / OPENCLIP_NAME / "checkpoints").glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not ckpts:
        raise SystemExit(f"open_clip wrote no checkpoint under {logs / OPENCLIP_NAME}")
    return parse_openclip_log(text), ckpts[-1], wall


def evaluate_val(model, text_tok, paths: dict, dataset_dir: str) -> dict:
    """evaluate's results on the validation split: one call for both trainers' models (CPU, batches of 256)."""
    from neuclip_ds.evaluate import evaluate

    val = paths["val"]
    return evaluate(
        model, val_data=val, tokenizer=text_tok, dataset_dir=dataset_dir, batch_size=256, device="cpu", progress=False
    )


def evaluate_openclip(model_name: str, ckpt: Path, preset, text_tok, paths: dict, dataset_dir: str) -> tuple:
    """(evaluate's results, tau) of an open_clip checkpoint."""
    import open_clip

    model = open_clip.create_model(model_name, precision="fp32", device="cpu")
    # written by the run just made; its optimizer state holds numpy scalars (lr from np.cos), which
    # weights_only=True refuses
    blob = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = {k.removeprefix("module."): v for k, v in blob["state_dict"].items()}
    model.load_state_dict(state, strict=True)
    tau = float(torch.exp(-state["logit_scale"].float()))
    adapter = OpenCLIPAdapter(
        model.eval(), image_size=preset.image_size, context_length=preset.context_length, pad_id=text_tok.pad_token_id
    )
    results = evaluate_val(adapter, text_tok, paths, dataset_dir)
    return results, tau


# ------------------------------------------------------------------------------------------------------------
# neuclip_ds side
# ------------------------------------------------------------------------------------------------------------
def evaluate_neuclip(run_dir: Path, text_tok, paths: dict, dataset_dir: str) -> tuple[dict, float, float]:
    """(evaluate's results from the checkpoint, tau of the checkpoint, largest |difference| to the run's own
    eval_results.json)."""
    from neuclip_ds.checkpoint import load_checkpoint_model

    model, _, _ = load_checkpoint_model(run_dir, tokenizer=text_tok)
    tau = float(model.temperature().detach())
    results = evaluate_val(model, text_tok, paths, dataset_dir)
    own = json.loads((run_dir / "eval_results.json").read_text())
    diff = max((abs(float(results[k]) - float(v)) for k, v in own.items() if k in results), default=float("nan"))
    return results, tau, diff


# ------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [RUN_OPENCLIP]:
        if len(argv) < 3 or argv[2] != "--":
            raise SystemExit(f"usage: {RUN_OPENCLIP} CONFIG.json -- OPEN_CLIP_ARGS...")
        return run_openclip_main(argv[1], argv[3:])
    parser = argparse.ArgumentParser(
        description="Quality parity: open_clip_train.main vs neuclip_ds on the same "
        "shards, model size and settings, one evaluation (see the module docstring)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="tiny", help="neuclip_ds preset (open_clip gets the same sizes)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of both trainers")
    parser.add_argument("--batch", type=int, default=128, help="global batch = open_clip's batch (1 process)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak lr (encoders and temperature)")
    parser.add_argument("--wd", type=float, default=0.1, help="weight decay of the >= 2-dim weights")
    parser.add_argument("--warmup", type=int, default=20, help="linear warmup steps, then cosine")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per trainer each")
    parser.add_argument("--losses", default="mbcl", help=f"neuclip_ds losses, comma-separated ({', '.join(LOSSES)})")
    parser.add_argument("--dataset-dir", default="data/digits", help="the embedded data set (shards, tokenizer)")
    parser.add_argument("--ds-config", default="ds_configs/zero2.json", help="neuclip_ds's DeepSpeed JSON")
    parser.add_argument(
        "--extra-neuclip-args",
        default="",
        help="appended to every neuclip-train command line "
        "(later flags win; differences to open_clip are listed in the output)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each trainer and the evaluation")
    parser.add_argument(
        "--same-init",
        action="store_true",
        help="start both trainers from one initialization per "
        "seed (open_clip's, converted for neuclip_ds: write_shared_init) to separate init from the rest",
    )
    parser.add_argument("--quick", action="store_true", help="first seed only, 1 epoch; prints, writes no --out")
    parser.add_argument("--runs", default="runs/vs_openclip_quality", help="run directories and results.json")
    parser.add_argument(
        "--out",
        default=None,
        help="markdown result (not with --quick; default benchmarks/results/"
        "vs_openclip_quality.md, with --same-init vs_openclip_quality_same_init.md)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        name = "vs_openclip_quality_same_init.md" if args.same_init else "vs_openclip_quality.md"
        args.out = str(ROOT / "benchmarks" / "results" / name)

    try:
        import open_clip
        import open_clip_train  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            "vs_openclip_quality: open_clip_train is not installed in this interpreter; run `make "
            "openclip-venv` and use .venv-openclip/bin/python"
        ) from e
    os.environ.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")  # before deepspeed is imported
    import deepspeed
    import yaml

    from neuclip_ds.config import parse_config
    from neuclip_ds.data.embedded import dataset_paths
    from neuclip_ds.data.tokenizer import TextTokenizer
    from neuclip_ds.presets import get_preset

    torch.set_num_threads(args.threads)
    shims = openclip_compat()
    losses = [s for s in args.losses.split(",") if s]
    bad = [s for s in losses if s not in LOSSES]
    if bad or not losses:
        raise SystemExit(f"--losses: choose from {', '.join(LOSSES)}, got {args.losses!r}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    epochs = args.epochs
    if args.quick:
        seeds, epochs = seeds[:1], 1
    dataset_dir = str((ROOT / args.dataset_dir).resolve())
    paths = dataset_paths(dataset_dir)
    preset = get_preset(args.preset)
    text_tok = TextTokenizer(paths["tokenizer"], context_length=preset.context_length)
    steps = steps_per_epoch(paths["num_train"], args.batch)
    yaml_config = yaml.safe_load((ROOT / "configs" / "tiny-neuclip.yaml").read_text()) or {}
    ds_config = str((ROOT / args.ds_config).resolve())
    runs_dir = (ROOT / args.runs).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    runs: list[dict] = []
    checks: list[str] = []
    commands: dict[str, str] = {}
    differences: dict[str, list[str]] = {}
    init_diffs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vs_openclip_quality_") as tmp:
        model_name, config_path, model_cfg = write_openclip_model(Path(tmp), preset, text_tok, paths["tokenizer"])
        open_clip.add_model_config(config_path)
        checks = check_setup(model_name, text_tok, preset, paths, dataset_dir)
        for line in checks:
            print(f"[check] {line}", flush=True)
        for seed in seeds:
            init_oc, init_nc = [], ""
            if args.same_init:
                ckpt, hf_dir, diff = write_shared_init(
                    model_name, preset, text_tok, seed, runs_dir / f"init_seed{seed}"
                )
                init_oc, init_nc = ["--pretrained", str(ckpt)], f" --pretrained-hf {shlex.quote(str(hf_dir))}"
                init_diffs.append(diff)
            # what both trainers get (and differences_from_openclip checks on neuclip_ds's parsed config)
            matched = dict(batch=args.batch, epochs=epochs, lr=args.lr, wd=args.wd, warmup=args.warmup, seed=seed)
            # open_clip
            logs = runs_dir / f"open_clip_seed{seed}"
            data = dict(train_data=paths["train"], num_samples=steps * args.batch)
            oc_argv = openclip_args(**matched, **data, model=model_name, logs=str(logs)) + init_oc
            commands["open_clip"] = "python -m open_clip_train.main " + shlex.join(oc_argv)
            print(f"[vs_openclip_quality] open_clip seed {seed}", flush=True)
            oc_rows, ckpt, wall = train_openclip(config_path, oc_argv, logs, args.threads)
            oc_steps = len(oc_rows)
            per_epoch = {e: sum(r["epoch"] == e for r in oc_rows) for e in range(epochs)}
            if any(n != steps for n in per_epoch.values()) or oc_rows[-1]["samples"] != steps * args.batch:
                raise SystemExit(f"open_clip: expected {steps} logged steps of {args.batch} per epoch, got {per_epoch}")
            results, tau = evaluate_openclip(model_name, ckpt, preset, text_tok, paths, dataset_dir)
            oc_run = {
                "trainer": "open_clip",
                "loss": "clip",
                "seed": seed,
                "tau": tau,
                "tau_last_step": 1.0 / oc_rows[-1]["logit_scale"],
                "steps": oc_steps,
                "eval": results,
                "train_loss": sum(r["loss"] for r in oc_rows[-LAST_STEPS:]) / len(oc_rows[-LAST_STEPS:]),
                "wall_s": wall,
                "lr": [r["lr"] for r in oc_rows],
                "checkpoint": str(ckpt),
            }
            runs.append(oc_run)
            print(
                f"  tau {tau:.4f}, zero-shot mean {100 * results.get('zeroshot/mean/top1', float('nan')):.2f} %,"
                f" {wall:.0f} s",
                flush=True,
            )
            # neuclip_ds
            for loss in losses:
                run_dir = runs_dir / f"neuclip_ds_{loss}_seed{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)
                nc_argv = neuclip_args(
                    **matched,
                    preset=args.preset,
                    dataset_dir=dataset_dir,
                    loss=loss,
                    yaml_config=yaml_config,
                    ds_config=ds_config,
                    extra=args.extra_neuclip_args + init_nc,
                )
                commands[f"neuclip_ds {loss}"] = "python -m neuclip_ds.train " + shlex.join(nc_argv)
                diffs = differences_from_openclip(parse_config(nc_argv), **matched)
                differences[f"neuclip_ds {loss}"] = diffs
                print(f"[vs_openclip_quality] neuclip_ds {loss} seed {seed}", flush=True)
                t0 = time.time()
                rows = train(nc_argv, run_dir, threads=args.threads)
                wall = time.time() - t0
                if len(rows) != steps * epochs:
                    raise SystemExit(f"neuclip_ds: expected {steps * epochs} steps, got {len(rows)}")
                results, tau, own_diff = evaluate_neuclip(run_dir, text_tok, paths, dataset_dir)
                lr_diff = lr_mismatch(oc_run["lr"], [r["lr"] for r in rows], args.lr)
                runs.append(
                    {
                        "trainer": "neuclip_ds",
                        "loss": loss,
                        "seed": seed,
                        "tau": tau,
                        "tau_last_step": rows[-1]["tau"],
                        "steps": len(rows),
                        "eval": results,
                        "train_loss": sum(r["loss"] for r in rows[-LAST_STEPS:]) / len(rows[-LAST_STEPS:]),
                        "wall_s": wall,
                        "eval_vs_own_eval_results": own_diff,
                        "lr_vs_open_clip_max_rel_diff": lr_diff,
                        "run_dir": str(run_dir),
                    }
                )
                print(
                    f"  tau {tau:.4f}, zero-shot mean {100 * results.get('zeroshot/mean/top1', float('nan')):.2f}"
                    f" %, {wall:.0f} s; re-evaluation vs its eval_results.json: max |diff| {own_diff:.2g}; lr vs "
                    f"open_clip's: max |diff| / lr {lr_diff:.2g}",
                    flush=True,
                )
    total = time.time() - t_start

    attributes = [
        k.split("/")[1]
        for k in runs[0]["eval"]
        if k.startswith("zeroshot/") and k.endswith("/top1") and k.split("/")[1] != "mean"
    ]
    nc_runs = [r for r in runs if r["trainer"] == "neuclip_ds"]
    lines = [
        f"command: {Path(sys.executable).parent.parent.name}/bin/python benchmarks/vs_openclip_quality.py "
        f"{' '.join(argv)}".rstrip(),
        f"preset {args.preset}, {epochs} epoch(s) x {steps} steps of {args.batch} ({steps * args.batch} of the "
        f"{paths['num_train']} train samples per epoch), lr {args.lr}, wd {args.wd}, warmup {args.warmup}, "
        f"AdamW betas ({ADAM['beta1']}, {ADAM['beta2']}) eps {ADAM['eps']}, grad clip {GRAD_CLIP}, fp32, "
        f"1 process x {args.threads} threads, seeds {','.join(map(str, seeds))}; torch {torch.__version__}, "
        f"open_clip {open_clip.__version__}, deepspeed {deepspeed.__version__}; wall {total / 60:.1f} min",
        f"evaluation: neuclip_ds.evaluate.evaluate on the {runs[0]['eval'].get('num_samples')} val samples "
        f"(one protocol for both; neuclip_ds re-evaluated from its checkpoint, max |diff| to its own "
        f"eval_results.json {max(r['eval_vs_own_eval_results'] for r in nc_runs):.2g}); lr sequences: max "
        f"|neuclip_ds − open_clip| / lr = {max(r['lr_vs_open_clip_max_rel_diff'] for r in nc_runs):.2g}",
        f"open_clip compatibility shims (openclip_compat): {'; '.join(shims) or 'none needed'}",
        "",
        *tables(runs, attributes),
        "",
        "Checked at run time: " + "; ".join(checks) + ".",
        "",
        "neuclip_ds settings that differ from open_clip's (its parsed command line vs open_clip's flags): "
        + ("; ".join(f"{k}: {', '.join(v)}" for k, v in differences.items() if v) or "none")
        + ".",
        (
            "Initialization: shared (--same-init): each seed's open_clip init, saved for open_clip's --pretrained "
            "and converted to a CLIPModel directory for neuclip_ds's --pretrained-hf; image and text features of "
            f"the two agree to {max(init_diffs):.1e}. "
            if args.same_init
            else ""
        )
        + "Not matched by construction: "
        + ("" if args.same_init else "model init (HF CLIPModel's vs open_clip's), ")
        + "shard and sample order (open_clip's sample shuffle is not seeded: its runs are not reproducible) and "
        "the crop RNG; see the script's docstring.",
        "",
        "Commands (last seed):",
        "",
    ]
    lines += [f"- {k}: `{v}`" for k, v in commands.items()]
    (runs_dir / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "epochs": epochs,
                "seeds": seeds,
                "steps_per_epoch": steps,
                "openclip_model": model_cfg,
                "checks": checks,
                "shims": shims,
                "same_init": args.same_init,
                "init_feature_diff": init_diffs,
                "commands": commands,
                "differences": differences,
                "runs": runs,
                "wall_s": total,
            },
            indent=1,
        )
    )
    report("\n".join(lines), args.out, write=not args.quick)
    print(f"raw results: {runs_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
