"""CLIP model presets: preset name -> HF CLIPVisionConfig / CLIPTextConfig.

Widths, depths, heads and embed dims follow OpenCLIP's model configs (ViT-B-32.json, ViT-B-16.json,
ViT-L-14.json, ViT-H-14.json). `tiny` is ours: it trains in minutes on 2 CPU cores with 32x32 images.
Nothing here downloads anything: models are built from these configs (or from a local HF directory, see model.py).
`Preset.flops_per_sample` counts the training FLOPs of one image-text pair (docs/performance.md: MFU).
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
    text_mlp_ratio: float = 4.0

    @classmethod
    def from_configs(cls, vision: CLIPVisionConfig, text: CLIPTextConfig, name: str = "custom") -> Preset:
        """The preset of towers built from other configs (a --pretrained-hf directory's), for `flops_per_sample`."""
        return cls(
            name,
            embed_dim=vision.projection_dim,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            vision_width=vision.hidden_size,
            vision_layers=vision.num_hidden_layers,
            vision_heads=vision.num_attention_heads,
            vision_mlp_ratio=vision.intermediate_size / vision.hidden_size,
            text_width=text.hidden_size,
            text_layers=text.num_hidden_layers,
            text_heads=text.num_attention_heads,
            context_length=text.max_position_embeddings,
            vocab_size=text.vocab_size,
            hidden_act=vision.hidden_act,
            text_mlp_ratio=text.intermediate_size / text.hidden_size,
        )

    def vision_flops(self) -> int:
        """Forward FLOPs of the vision tower for one image: matmuls (2 m n k each): the patch embedding (a
        convolution of stride = kernel, i.e. one matmul over the patches), per layer the q, k, v and output
        projections, the attention scores (q k^T) and values (p v) over patches + 1 positions and the MLP, and the
        projection of the pooled token."""
        patches = (self.image_size // self.patch_size) ** 2
        return self.patch_embedding_flops() + _tower_flops(
            positions=patches + 1,
            width=self.vision_width,
            mlp=int(self.vision_width * self.vision_mlp_ratio),
            layers=self.vision_layers,
            embed_dim=self.embed_dim,
        )

    def patch_embedding_flops(self) -> int:
        """Forward FLOPs of the patch embedding of one image (its backward computes the weight gradient only)."""
        patches = (self.image_size // self.patch_size) ** 2
        return 2 * patches * 3 * self.patch_size**2 * self.vision_width

    def text_flops(self, text_tokens: int | None = None) -> int:
        """Forward FLOPs of the text tower for one caption over `text_tokens` positions (default: the context
        length), counted as in `vision_flops` (the token embedding is a lookup: no FLOPs). The causal mask is not
        exploited: attention counts all positions x positions, as the kernels compute them."""
        positions = self.context_length if text_tokens is None else text_tokens
        if not 1 <= positions <= self.context_length:
            raise ValueError(f"text_tokens: must be in [1, {self.context_length}], got {text_tokens}")
        return _tower_flops(
            positions=positions,
            width=self.text_width,
            mlp=int(self.text_width * self.text_mlp_ratio),
            layers=self.text_layers,
            embed_dim=self.embed_dim,
        )

    def flops_per_sample(self, text_tokens: int | None = None) -> int:
        """Training FLOPs of one image-text pair, forward + backward, vision + text: the model FLOPs of MFU.

        Backward = 2x forward for every matmul (the gradients of its input and of its weight), except the patch
        embedding, whose input (the pixels) needs no gradient: 1x. So 3 x forward - the patch embedding's
        forward. Only matmuls count: layer norms, softmax, GELU, residual adds, embeddings lookups, the loss (a
        B x B similarity per step, negligible next to the towers) and the NPN are ignored; so is recomputation
        (activation checkpointing, the re-encoding of micro-batches under accumulation), as MFU does.

        text_tokens: the text positions the text tower ran (default: the context length, 77 for the OpenCLIP
        presets; with --text-padding longest each micro-batch runs only up to its longest caption, and the run
        counts that)."""
        return 3 * (self.vision_flops() + self.text_flops(text_tokens)) - self.patch_embedding_flops()

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
            intermediate_size=int(self.text_width * self.text_mlp_ratio),
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=self.context_length,
            projection_dim=self.embed_dim,
            hidden_act=self.hidden_act,
            **kwargs,
        )


def _tower_flops(*, positions: int, width: int, mlp: int, layers: int, embed_dim: int) -> int:
    """Forward matmul FLOPs of a pre-LN transformer tower over `positions` tokens of one sample, plus the
    projection of its pooled token to `embed_dim`."""
    projections = 2 * positions * (4 * width * width + 2 * width * mlp)  # q, k, v, out; MLP up and down
    attention = 2 * 2 * positions * positions * width  # q k^T and p v, over all heads
    return layers * (projections + attention) + 2 * width * embed_dim


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
