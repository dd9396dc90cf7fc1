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
