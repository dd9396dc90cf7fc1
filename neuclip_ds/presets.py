"""CLIP model presets: preset name -> HF CLIPVisionConfig / CLIPTextConfig.

Widths, depths, heads and embed dims follow OpenCLIP's model configs (ViT-B-32.json, ViT-B-16.json,
ViT-L-14.json, ViT-H-14.json). `tiny` is ours: it trains in minutes on 2 CPU cores with 32x32 images.
Nothing here downloads anything: models are built from these configs (or from a local HF directory, see model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPTextConfig, CLIPVisionConfig

# The OpenAI/OpenCLIP BPE vocabulary; presets that train with another tokenizer override vocab_size.
CLIP_VOCAB_SIZE = 49408


@dataclass(frozen=True)
class Preset:
    name: str
    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp_ratio: float
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int = 77
    vocab_size: int = CLIP_VOCAB_SIZE
    hidden_act: str = "gelu"

    def vision_config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=self.vision_width,
            intermediate_size=int(self.vision_width * self.vision_mlp_ratio),
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            projection_dim=self.embed_dim,
            hidden_act=self.hidden_act,
        )

    def text_config(
        self,
        *,
        vocab_size: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
    ) -> CLIPTextConfig:
        vocab_size = vocab_size or self.vocab_size
        if vocab_size != CLIP_VOCAB_SIZE:
            # keep the special ids inside a smaller vocabulary unless the tokenizer says otherwise
            bos_token_id = vocab_size - 2 if bos_token_id is None else bos_token_id
            eos_token_id = vocab_size - 1 if eos_token_id is None else eos_token_id
            pad_token_id = 0 if pad_token_id is None else pad_token_id
        kwargs = {}
        # HF CLIPTextModel pools at the first eos position unless eos_token_id == 2 (legacy argmax pooling);
        # a tokenizer of our own must therefore pass its real eos id.
        for key, value in (
            ("eos_token_id", eos_token_id),
            ("pad_token_id", pad_token_id),
            ("bos_token_id", bos_token_id),
        ):
            if value is not None:
                kwargs[key] = value
        return CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=self.text_width,
            intermediate_size=4 * self.text_width,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=self.context_length,
            projection_dim=self.embed_dim,
            hidden_act=self.hidden_act,
            **kwargs,
        )


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        embed_dim=64,
        image_size=32,
        patch_size=8,
        vision_width=128,
        vision_layers=2,
        vision_heads=4,
        vision_mlp_ratio=2.0,
        text_width=128,
        text_layers=2,
        text_heads=4,
        context_length=32,
        vocab_size=1024,
    ),
    "ViT-B-32": Preset(
        "ViT-B-32",
        embed_dim=512,
        image_size=224,
        patch_size=32,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        vision_mlp_ratio=4.0,
        text_width=512,
        text_layers=12,
        text_heads=8,
    ),
    "ViT-B-16": Preset(
        "ViT-B-16",
        embed_dim=512,
        image_size=224,
        patch_size=16,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        vision_mlp_ratio=4.0,
        text_width=512,
        text_layers=12,
        text_heads=8,
    ),
    "ViT-L-14": Preset(
        "ViT-L-14",
        embed_dim=768,
        image_size=224,
        patch_size=14,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        vision_mlp_ratio=4.0,
        text_width=768,
        text_layers=12,
        text_heads=12,
    ),
    # OpenCLIP ViT-H-14: vision width 1280 x 32 layers (head width 80 -> 16 heads), text 1024 x 24 layers.
    "ViT-H-14": Preset(
        "ViT-H-14",
        embed_dim=1024,
        image_size=224,
        patch_size=14,
        vision_width=1280,
        vision_layers=32,
        vision_heads=16,
        vision_mlp_ratio=4.0,
        text_width=1024,
        text_layers=24,
        text_heads=16,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
