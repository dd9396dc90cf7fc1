"""The CLIP dual encoder: HF vision/text towers with projections and a learnable temperature.

The temperature is one shape-[1] parameter (DeepSpeed ZeRO-2/3 crash on 0-dim parameters, see docs/pitfalls.md),
in one of two parametrizations (`tau_param`):
    log  `logit_scale` = log(1/tau), as OpenCLIP and FastCLIP store it: an optimizer step changes tau by a
         fraction of itself, the same at tau = 0.5 as at 0.01 (the default, see docs/training.md, "Temperature")
    raw  `tau` itself: a step moves tau by about the learning rate, which at lr 2e-3 is 20 % of tau = 0.01
The range [tau_min, tau_max] is kept on the *stored* parameter by the engine after every optimizer step
(`engine.TemperatureKeeper`, on DeepSpeed's fp32 master copy), never by a clamp inside forward: a forward clamp
zeroes the gradient once the optimizer carries the parameter past the bound, and tau could never come back.
Under ZeRO-3 parameters are empty outside forward, so forward returns tau (and the SigLIP bias) together with the
features.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .presets import get_preset

TAU_PARAMS = ("log", "raw")


def temperature_from_parameter(p: torch.Tensor, tau_param: str) -> torch.Tensor:
    return torch.exp(-p) if tau_param == "log" else p


def parameter_bounds(tau_param: str, tau_min: float, tau_max: float) -> tuple[float, float]:
    if tau_param == "log":
        return math.log(1.0 / tau_max), math.log(1.0 / tau_min)
    return tau_min, tau_max


class CLIPDualEncoder(nn.Module):
    """Image and text towers mapping to one L2-normalized embedding space, plus tau (and an optional bias)."""

    def __init__(
        self,
        vision_config: CLIPVisionConfig,
        text_config: CLIPTextConfig,
        *,
        init_tau: float = 0.07,
        tau_min: float = 0.01,
        tau_max: float = 1.0,
        tau_param: str = "log",
        with_bias: bool = False,
        init_bias: float = -10.0,
    ) -> None:
        super().__init__()
        if not 0 < tau_min <= init_tau <= tau_max:
            raise ValueError(f"init_tau: need 0 < tau_min <= init_tau <= tau_max, got {tau_min}, {init_tau}, {tau_max}")
        if tau_param not in TAU_PARAMS:
            raise ValueError(f"tau_param: must be one of {', '.join(TAU_PARAMS)}, got {tau_param!r}")
        self.visual = CLIPVisionModelWithProjection(vision_config)
        self.text = CLIPTextModelWithProjection(text_config)
        self.tau_min, self.tau_max, self.tau_param = float(tau_min), float(tau_max), tau_param
        if tau_param == "log":
            self.logit_scale = nn.Parameter(torch.full([1], math.log(1.0 / init_tau)))
        else:
            self.tau = nn.Parameter(torch.full([1], float(init_tau)))
        # SigLIP's learnable logit bias (only created when that loss is used: unused parameters would get no grad)
        self.logit_bias = nn.Parameter(torch.full([1], float(init_bias))) if with_bias else None

    @property
    def image_size(self) -> int:
        return self.visual.config.image_size

    @property
    def context_length(self) -> int:
        return self.text.config.max_position_embeddings

    def hf_config(self) -> CLIPConfig:
        """The transformers.CLIPConfig of the same towers (for export to a CLIPModel directory)."""
        return CLIPConfig(
            text_config=self.text.config.to_dict(),
            vision_config=self.visual.config.to_dict(),
            projection_dim=self.visual.config.projection_dim,
        )

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for tower in (self.visual, self.text):
            # transformers >= 5 renamed gradient_* to activation_checkpointing_*; support both
            if enabled:
                if hasattr(tower, "activation_checkpointing_enable"):
                    tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                getattr(tower, "activation_checkpointing_disable", tower.gradient_checkpointing_disable)()

    @property
    def temperature_parameter(self) -> nn.Parameter:
        """The stored temperature parameter (logit_scale or tau, by `tau_param`)."""
        return self.logit_scale if self.tau_param == "log" else self.tau

    def temperature_bounds(self) -> tuple[float, float]:
        """[tau_min, tau_max] in the stored parametrization (log: [log 1/tau_max, log 1/tau_min])."""
        return parameter_bounds(self.tau_param, self.tau_min, self.tau_max)

    def temperature(self) -> torch.Tensor:
        """tau, shape [1], from the stored parameter (kept inside its range by the engine, not here)."""
        return temperature_from_parameter(self.temperature_parameter, self.tau_param)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixel_values=pixel_values).image_embeds, dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.text(input_ids=input_ids, attention_mask=attention_mask).text_embeds, dim=-1)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out = {
            "img": self.encode_image(pixel_values),
            "txt": self.encode_text(input_ids, attention_mask),
            "tau": self.temperature(),
        }
        if self.logit_bias is not None:
            out["bias"] = self.logit_bias
        return out


@dataclass(frozen=True)
class Geometry:
    """What the data must look like for a model: the image side, the text context length, and the vocabulary with
    its special ids (the ids synthetic captions use; a tokenizer brings its own)."""

    image_size: int
    context_length: int
    vocab_size: int
    eos_token_id: int
    bos_token_id: int
    pad_token_id: int


def model_geometry(preset: str, hf_dir: str | Path | None = None) -> Geometry:
    """The input geometry of the model `build_model` makes: a local HF CLIPModel directory's (`hf_dir`, read from
    its config.json), else the preset's. ValueError when `hf_dir` holds no readable CLIP config."""
    if hf_dir is None:
        p = get_preset(preset)
        return Geometry(p.image_size, p.context_length, p.vocab_size, p.vocab_size - 1, p.vocab_size - 2, 0)
    try:
        config = CLIPConfig.from_pretrained(hf_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{hf_dir} holds no readable CLIPModel config.json ({str(e).splitlines()[0]})") from None
    text, vision = config.text_config, config.vision_config
    # eos 2 is transformers' mark of OpenAI's configs, which pool at the largest id: synthetic captions end there
    eos = text.vocab_size - 1 if text.eos_token_id == 2 else text.eos_token_id
    return Geometry(
        vision.image_size, text.max_position_embeddings, text.vocab_size, eos, text.bos_token_id, text.pad_token_id
    )


def build_model(
    preset: str,
    *,
    vocab_size: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    init_tau: float = 0.07,
    tau_min: float = 0.01,
    tau_max: float = 1.0,
    tau_param: str = "log",
    with_bias: bool = False,
    grad_checkpointing: bool = False,
    hf_dir: str | Path | None = None,
) -> CLIPDualEncoder:
    """Build a preset from its config (no download), or load a local HF CLIPModel directory for fine-tuning."""
    if hf_dir is not None:
        model = load_hf_clip(hf_dir, tau_min=tau_min, tau_max=tau_max, tau_param=tau_param, with_bias=with_bias)
    else:
        p = get_preset(preset)
        model = CLIPDualEncoder(
            p.vision_config(),
            p.text_config(
                vocab_size=vocab_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id
            ),
            init_tau=init_tau,
            tau_min=tau_min,
            tau_max=tau_max,
            tau_param=tau_param,
            with_bias=with_bias,
        )
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def reinitialize_partitioned(model: CLIPDualEncoder) -> None:
    """Apply the HF CLIP initialization to a model built under `deepspeed.zero.Init`.

    zero.Init partitions each parameter as soon as it is created, so the towers' own initialization (run at the
    end of their __init__) writes into empty partitions and torch's defaults remain (token/position embeddings
    N(0, 1) instead of N(0, 0.02)). Gather each tower once, re-run the HF initialization on rank 0, and let
    DeepSpeed re-partition (broadcasting rank 0's values)."""
    import deepspeed

    for tower in (model.visual, model.text):
        for module in tower.modules():
            module._is_hf_initialized = False
            for p in module.parameters(recurse=False):
                p._is_hf_initialized = False
        with deepspeed.zero.GatheredParameters(list(tower.parameters()), modifier_rank=0):
            tower.initialize_weights()


def load_hf_clip(
    hf_dir: str | Path, *, tau_min: float = 0.01, tau_max: float = 1.0, tau_param: str = "log", with_bias: bool = False
) -> CLIPDualEncoder:
    """A local `transformers.CLIPModel` directory -> CLIPDualEncoder with the same weights.

    CLIPModel and the *WithProjection towers share parameter names (vision_model.*, visual_projection.*, ...), so
    the towers load by name; tau = 1 / exp(logit_scale) (CLIPModel keeps the log of the inverse temperature)."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"hf_dir: {hf_dir} is not a transformers CLIPModel directory (no config.json)")
    clip = CLIPModel.from_pretrained(hf_dir, local_files_only=True)
    tau = float(torch.exp(-clip.logit_scale.detach().float()))
    tau = min(max(tau, tau_min), tau_max)
    # CLIPModel sizes its projections by the top-level projection_dim, whatever the tower configs say
    vision_config, text_config = copy.deepcopy(clip.config.vision_config), copy.deepcopy(clip.config.text_config)
    vision_config.projection_dim = text_config.projection_dim = clip.config.projection_dim
    model = CLIPDualEncoder(
        vision_config,
        text_config,
        init_tau=tau,
        tau_min=tau_min,
        tau_max=tau_max,
        tau_param=tau_param,
        with_bias=with_bias,
    )
    state = clip.state_dict()
    for tower, prefixes in (
        (model.visual, ("vision_model.", "visual_projection.")),
        (model.text, ("text_model.", "text_projection.")),
    ):
        tower_state = {k: v for k, v in state.items() if k.startswith(prefixes)}
        missing, unexpected = tower.load_state_dict(tower_state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(
                f"hf_dir: {hf_dir} does not match the CLIP towers (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    return model
