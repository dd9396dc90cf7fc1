"""benchmarks/scale_plan.py: its parameter count, its use of DeepSpeed's estimators, its memory probe, and the
8 x H100 DeepSpeed configs it plans for."""

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

from neuclip_ds.config import parse_config
from neuclip_ds.model import build_model

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is not a package: load the script as a module
_spec = importlib.util.spec_from_file_location("scale_plan", ROOT / "benchmarks" / "scale_plan.py")
plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan)


def _printed_row(estimator, *args, options: str) -> str:
    """The row of an estimate_*_all_cold table (they print, they return nothing) with the given options."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        estimator(*args, num_gpus_per_node=8, num_nodes=1)
    return next(ln for ln in buf.getvalue().splitlines() if ln.rstrip().endswith(options))


def test_param_count_and_zero_model_states():
    counts = plan.count_params("ViT-B-32")  # meta device
    real = build_model("ViT-B-32")
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    assert counts["vision"] + counts["text"] + real.temperature_parameter.numel() == counts["total"]
    assert counts["largest"] == real.text.text_model.embeddings.token_embedding.weight.numel()
    P, L = counts["total"], counts["largest"]
    one, eight = (plan.model_states_bytes(3, P, L, gpus, 1) for gpus in (1, 8))
    assert eight < one
    # DeepSpeed's ZeRO-3 formula without offload: 4 L + 18 P / N bytes per GPU
    assert eight / one == pytest.approx((4 * L + 18 * P / 8) / (4 * L + 18 * P), rel=1e-6)
    # the figures are the non-offload rows DeepSpeed's *_all_cold estimators print
    assert f"{eight / 2**30:6.2f}GB" in _printed_row(
        estimate_zero3_model_states_mem_needs_all_cold,
        P,
        L,
        options="offload_param=none, offload_optimizer=none, zero_init=1",
    )
    z2 = plan.model_states_bytes(2, P, L, 8, 1)
    assert f"{z2 / 2**30:6.2f}GB" in _printed_row(
        estimate_zero2_model_states_mem_needs_all_cold, P, options="offload_optimizer=none"
    )


def test_memory_probe_counts_new_storages_once():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g, requires_grad=True)  # exists before: never counted, though autograd saves it
    probe = plan.MemoryProbe()
    with probe, torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
        h = torch.ones(4, 256) @ w  # the ones (4 KB) are saved for grad_w; h (4 KB) is kept by this frame
        y = h.relu().view(-1)  # relu's output (4 KB) is saved; its view is the same storage
        probe.mark("forward")
    assert probe.marks["forward"] == (3 * 4096, 2 * 4096)  # (alive, saved)
    assert probe.peak == 3 * 4096 and y.numel() == 1024


def test_checkpointing_needs_less_activation_memory_on_tiny():
    act = plan.measure_activations("tiny")
    for key in ("peak", "saved_vision", "saved_text", "held_vision", "held_text"):
        assert 0 < act[(key, True)]["per_sample"] < act[(key, False)]["per_sample"], key
        assert act[(key, False)]["nonlinearity"] < 0.01, key
    no_ckpt = act[("held_vision", False)]["per_sample"] + act[("held_text", False)]["per_sample"]
    assert act[("peak", False)]["per_sample"] >= no_ckpt  # the peak holds every activation at once


def test_loss_and_npn_peaks_are_a_few_matrices():
    """The loss / NPN peaks in units of one fp32 [b x B] / [B x m] matrix (what the batch plan and
    benchmarks/gpu_check.py's prediction add): a handful of matrices, whatever n."""
    assert 2 < plan.measure_loss_factor(n=256) < 16
    assert 2 < plan.measure_npn_factor(n=256, prototypes=128) < 16


@pytest.mark.parametrize(
    "preset, path, stage",
    [("ViT-L-14", "ds_configs/vit_l14_8xh100.json", 2), ("ViT-H-14", "ds_configs/vit_h14_8xh100.json", 3)],
)
def test_h100_ds_configs_are_valid(preset, path, stage):
    ds = json.loads((ROOT / path).read_text())
    DeepSpeedZeroConfig(**ds["zero_optimization"])  # DeepSpeed's own model: rejects unknown or mistyped keys
    run = "--synthetic-samples 64 --steps 1 --global-batch-size 2048 --precision bf16 --grad-checkpointing".split()
    cfg = parse_config(["--preset", preset, "--ds-config", str(ROOT / path), *run]).validate(world_size=8)
    assert cfg.ds.zero_stage == stage and cfg.ds.gradient_accumulation_steps == 1
