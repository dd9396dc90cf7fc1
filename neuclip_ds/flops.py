"""Achieved TFLOPS and MFU of the training steps (docs/performance.md).

The FLOPs of a step are the model FLOPs of `Preset.flops_per_sample` (forward + backward, matmuls only) for each
sample of this rank's micro-batches, at the text positions each micro-batch ran. MFU = achieved / peak, where the
peak is --peak-tflops (per rank) or, on CPU without it, a matmul timed once at start-up; on a GPU without
--peak-tflops the peak is unknown and mfu is left out (no table of device peaks is guessed)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .data.tokenizer import trim_text_padding
from .presets import Preset

MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "pure_bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype the towers' matmuls run in under --precision."""
    return MATMUL_DTYPES[precision]


def measure_matmul_tflops(dtype: torch.dtype = torch.float32, *, size: int = 1024, seconds: float = 1.0) -> float:
    """A CPU matmul peak: square `size` matmuls in `dtype` for about `seconds`, on torch's current threads. The
    best of short rounds, so that a moment when other processes held the cores does not lower it."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.mm(a, b)  # warm-up (and the output buffer)
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        start, n = time.perf_counter(), 0
        while n == 0 or time.perf_counter() - start < seconds / 10:
            torch.mm(a, b, out=out)
            n += 1
        elapsed = time.perf_counter() - start
        best = max(best, 2 * size**3 * n / elapsed / 1e12)
        if time.perf_counter() >= deadline:
            return best


def text_positions(attention_mask: torch.Tensor | None, context_length: int, text_padding: str) -> int:
    """The text positions the text tower runs for a micro-batch: the context length, or with --text-padding
    longest the batch's longest caption (what the engine trims to)."""
    if text_padding != "longest" or attention_mask is None:
        return context_length
    _, mask = trim_text_padding(attention_mask, attention_mask)
    return mask.shape[1]


def step_flops(preset: Preset, micro_batches: list[dict], text_padding: str) -> int:
    """Model FLOPs of this rank's step: each micro-batch's samples at the text positions it ran."""
    total = 0
    for mb in micro_batches:
        mask = mb.get("attention_mask")
        positions = text_positions(mask, min(preset.context_length, mb["input_ids"].shape[1]), text_padding)
        total += len(mb["input_ids"]) * preset.flops_per_sample(positions)
    return total


@dataclass(frozen=True)
class Peak:
    """The peak TFLOPS of one rank (None: unknown, no mfu) and where it comes from, for the banner."""

    tflops: float | None
    source: str

    def describe(self) -> str:
        if self.tflops is None:
            return self.source
        return f"{self.tflops:.4g} TFLOPS ({self.source})"


def resolve_peak(peak_tflops: float | None, precision: str, device: torch.device) -> Peak:
    """--peak-tflops when given; else on CPU a measured matmul peak (about 1 s); else unknown."""
    if peak_tflops is not None:
        return Peak(float(peak_tflops), "--peak-tflops")
    if device.type == "cpu":
        dtype = matmul_dtype(precision)
        measured = measure_matmul_tflops(dtype)
        name = str(dtype).removeprefix("torch.")
        return Peak(measured, f"measured: {name} matmul on {torch.get_num_threads()} threads; --peak-tflops to set")
    return Peak(None, f"unknown on {device.type}: give --peak-tflops for mfu in metrics.jsonl")


def throughput_metrics(flops: int, seconds: float, peak: Peak) -> dict:
    """`tflops_per_rank` (achieved) and `mfu` (when the peak is known) of a step of `flops` in `seconds`."""
    achieved = flops / seconds / 1e12 if seconds > 0 else float("nan")
    out = {"tflops_per_rank": achieved}
    if peak.tflops is not None:
        out["mfu"] = achieved / peak.tflops
    return out


def npn_flops_per_step(rows: int, prototypes: int, dim: int, inner_steps: int) -> int:
    """FLOPs of the NPN's part of a step (E7.2) on `rows` anchors per side: T_u AdaGrad steps on E5, each the
    [rows x m] similarities to the prototypes forward (2·rows·m·d) and backward (2·rows·m·d: the prototypes'
    gradient only, the anchors are constants of E5), then one forward to predict α; both sides (image and text).
    `rows` is this rank's local batch under --npn-parallel sharded, the global batch under replicated (E8)."""
    per_side = inner_steps * 4 * rows * prototypes * dim + 2 * rows * prototypes * dim
    return 2 * per_side


def npn_flops_share(
    preset: Preset,
    *,
    per_rank_batch: int,
    world_size: int,
    prototypes: int,
    inner_steps: int,
    parallel: str = "sharded",
    text_tokens: int | None = None,
) -> float:
    """The NPN's FLOPs ÷ the encoders' model FLOPs (fwd + bwd) of one rank's step."""
    rows = per_rank_batch if parallel == "sharded" else per_rank_batch * world_size
    npn = npn_flops_per_step(rows, prototypes, preset.embed_dim, inner_steps)
    return npn / (per_rank_batch * preset.flops_per_sample(text_tokens))


# A paper-scale reference for the banner: ViT-B-16 on one node of 8 GPUs at 256 per GPU, m = 4096, T_u = 10 (the
# method's defaults, docs/method.md; the paper reports the NPN at 6-9 % of a step's time on 8 x H100).
PAPER_SCALE = {"preset": "ViT-B-16", "per_rank_batch": 256, "world_size": 8, "prototypes": 4096, "inner_steps": 10}


def describe_npn_share(
    preset: Preset, *, per_rank_batch: int, world_size: int, prototypes: int, inner_steps: int, parallel: str
) -> str:
    """The banner's NPN line: its FLOP share of this run's step beside the share at the paper's scale, so that
    the NPN's share of a small model's step *time* (kernel launches and one all-reduce per inner step, which a
    large model's step hides) is not read as NeuCLIP's cost at scale."""
    from .presets import get_preset

    here = npn_flops_share(
        preset,
        per_rank_batch=per_rank_batch,
        world_size=world_size,
        prototypes=prototypes,
        inner_steps=inner_steps,
        parallel=parallel,
    )
    ref = dict(PAPER_SCALE)
    paper = npn_flops_share(get_preset(ref.pop("preset")), **ref, parallel=parallel)
    return (
        f"m {prototypes}, T_u {inner_steps}, {parallel}: {here:.2%} of a step's model FLOPs here, "
        f"{paper:.2%} for ViT-B-16 at 256/GPU on 8 GPUs with m 4096, T_u 10"
    )
