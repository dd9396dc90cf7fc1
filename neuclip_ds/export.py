"""`neuclip-export --checkpoint DIR --out HF_DIR`: a trainer checkpoint -> a `transformers.CLIPModel` directory.

ZeRO shards are consolidated by DeepSpeed's own zero_to_fp32 utilities (exact fp32 masters), the keys are renamed to
CLIPModel's (the towers already use CLIPModel's names under `visual.` / `text.`) and tau becomes CLIPModel's 0-dim
`logit_scale = log(1 / tau)`. Written: model.safetensors + config.json, the run's tokenizer, an image processor
config matching the eval transform (resize shortest side, center crop, CLIP mean/std), and beside them the NPN
(`npn.safetensors` + `npn_config.json`, for users who want the normalizer predictor) and `neuclip_export.json`
(tau, SigLIP bias, source checkpoint). `CLIPModel.from_pretrained(HF_DIR)` then gives the trained embeddings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from .checkpoint import (
    COMPLETE,
    SHARED_FILE,
    CheckpointError,
    load_checkpoint_state_dict,
    load_data,
    model_from_state_dict,
    read_run_config,
    resolve_checkpoint,
)

TOWER_PREFIXES = ("visual.", "text.")  # visual.vision_model.* -> vision_model.*, text.text_model.* -> text_model.*


class ExportError(ValueError):
    """Reported by the CLI as one line (exit code 2)."""


def clip_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIPDualEncoder state -> CLIPModel state (rename + tau -> 0-dim logit_scale)."""
    out = {}
    for key, value in model.state_dict().items():
        for prefix in TOWER_PREFIXES:
            if key.startswith(prefix):
                out[key[len(prefix) :]] = value
    tau = float(model.temperature().detach())
    out["logit_scale"] = torch.tensor(math.log(1.0 / tau))
    return out


def export_hf(checkpoint: str | Path, out: str | Path, *, tag: str | None = None, overwrite: bool = False) -> dict:
    from transformers import CLIPImageProcessor, CLIPModel

    from .data.tokenizer import TextTokenizer
    from .data.transforms import CLIP_MEAN, CLIP_STD

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out: {out} exists and is not empty (pass --overwrite to replace it)")
    try:
        ckpt_dir, tag, run_dir = resolve_checkpoint(checkpoint, tag)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    tag_dir = ckpt_dir / tag
    if (tag_dir / SHARED_FILE).exists() and not (tag_dir / COMPLETE).is_file():
        raise ExportError(f"--checkpoint: {tag_dir} is not a complete checkpoint (its save was interrupted)")
    config = read_run_config(run_dir, ckpt_dir, tag)
    tokenizer = None
    if config.get("tokenizer"):
        if not Path(config["tokenizer"]).is_dir():
            raise ExportError(f"--checkpoint: the run's tokenizer {config['tokenizer']} is missing")
        tokenizer = TextTokenizer(config["tokenizer"], context_length=77)
    model = model_from_state_dict(load_checkpoint_state_dict(ckpt_dir, tag), config, tokenizer)

    clip = CLIPModel(model.hf_config())
    missing, unexpected = clip.load_state_dict(clip_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ExportError(
            f"--checkpoint: weights do not map onto CLIPModel (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    out.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(out, safe_serialization=True)
    size = model.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(out)
    if tokenizer is not None:
        _export_tokenizer(config["tokenizer"], out, context_length=model.context_length)
    info = {
        "source_checkpoint": str(tag_dir),
        "tau": float(model.temperature().detach()),
        "logit_bias": float(model.logit_bias.detach()) if model.logit_bias is not None else None,
        "loss": config.get("loss"),
        "preset": config.get("preset"),
    }
    info["npn"] = _export_npn(tag_dir, out)
    (out / "neuclip_export.json").write_text(json.dumps(info, indent=2))
    _readable_by_others(out)
    return info


def _readable_by_others(out: Path) -> None:
    """safetensors writes its files 0600; a model directory is for others to load, so every file gets the mode a
    plain write would have given it (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _export_tokenizer(src: str, out: Path, *, context_length: int) -> None:
    """The run's tokenizer, made to add bos/eos by itself (the trainer's TextTokenizer adds them explicitly; a
    plain `AutoTokenizer` user must get the same ids, since CLIPTextModel pools at the eos position)."""
    from tokenizers import pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(src)
    specials = [(t, tok.convert_tokens_to_ids(t)) for t in (tok.bos_token, tok.eos_token) if t is not None]
    template = f"{tok.bos_token} $A {tok.eos_token}" if tok.bos_token is not None else f"$A {tok.eos_token}"
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=template, special_tokens=specials)
    # transformers 4.x's CLIPProcessor loads the tokenizer as CLIPTokenizerFast, which refuses a pre-tokenizer that
    # is not a Sequence; a Sequence of the one step splits text the same way
    if not isinstance(tok.backend_tokenizer.pre_tokenizer, pre_tokenizers.Sequence):
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([tok.backend_tokenizer.pre_tokenizer])
    tok.model_max_length = context_length
    tok.save_pretrained(out)
    # transformers 5 records its own class name (TokenizersBackend), which 4.x cannot load;
    # PreTrainedTokenizerFast is the name both read as "the tokenizer in tokenizer.json"
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"])
    config_path.write_text(json.dumps(config, indent=2))


def _export_npn(tag_dir: Path, out: Path) -> str | None:
    from safetensors.torch import save_file

    path = tag_dir / SHARED_FILE
    if not path.is_file():
        return None
    shared = load_data(path)
    npn = (shared.get("estimator") or {}).get("npn")
    if not npn:
        return None
    weights = {k: v.contiguous() for k, v in npn["net"].items()}
    save_file(weights, out / "npn.safetensors")
    config = shared.get("config", {})
    meta = {
        "variant": npn.get("variant"),
        "eps": config.get("normalizer_eps", config.get("eps")),  # an older config.yaml names it eps
        "num_prototypes": config.get("npn_prototypes"),
        "equation": "E4: alpha1_i = log(eps + 1/m sum_k exp((cos(e1_i, W1_k) - s_ii)/tau)); "
        "W1 = proto_txt, W2 = proto_img",
    }
    (out / "npn_config.json").write_text(json.dumps(meta, indent=2))
    return "npn.safetensors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neuclip-export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir or a stepNNNNNNNN dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    parser.add_argument("--out", required=True, help="output directory for the transformers CLIPModel")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        info = export_hf(args.checkpoint, args.out, tag=args.tag, overwrite=args.overwrite)
    except (ExportError, CheckpointError) as e:
        print(f"neuclip-export: error: {e}", file=sys.stderr)
        return 2
    print(
        f"exported {info['source_checkpoint']} -> {args.out} (tau {info['tau']:.4f}"
        f"{', NPN beside it' if info['npn'] else ''}); load with transformers.CLIPModel.from_pretrained"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
