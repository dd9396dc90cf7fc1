"""MFU (issue 16, item 3): the analytic FLOPs of presets.py against torch's FlopCounterMode on the real towers, the
matmul peak measurement and the per-step count of the text positions a run actually uses."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from neuclip_ds import metrics as M
from neuclip_ds.flops import (
    Peak,
    matmul_dtype,
    measure_matmul_tflops,
    resolve_peak,
    step_flops,
    throughput_metrics,
)
from neuclip_ds.model import build_model
from neuclip_ds.presets import PRESETS, Preset, get_preset


def counted_flops_per_sample(name: str, text_tokens: int, batch: int = 2) -> float:
    """FlopCounterMode's count of one forward + backward of the dual encoder, per sample. Built on the meta device:
    shapes only, no weights, no arithmetic (ViT-B-32 in well under a second). Eager attention: the counter has no
    formula for the CPU SDPA kernel (it would count attention as 0), while eager attention is two plain matmuls
    the counter sees; both compute the same products."""
    p = get_preset(name)
    with torch.device("meta"):
        model = build_model(name)
        for tower in (model.visual, model.text):
            tower.config._attn_implementation = "eager"
        pixels = torch.randn(batch, 3, p.image_size, p.image_size)
        ids = torch.randint(1, p.vocab_size - 2, (batch, text_tokens))
        mask = torch.ones(batch, text_tokens, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(pixels, ids, mask)
        (out["img"].sum() + out["txt"].sum()).backward()
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("name", ["tiny", "ViT-B-32"])
@pytest.mark.parametrize("full_context", [True, False])
def test_flops_per_sample_matches_torch_flop_counter(name, full_context):
    p = get_preset(name)
    text_tokens = p.context_length if full_context else 10  # 10: --text-padding longest on short captions
    analytic = p.flops_per_sample(None if full_context else text_tokens)
    counted = counted_flops_per_sample(name, text_tokens)
    # both count the same matmuls (the counter also sees only matmuls and convolutions), so they agree exactly
    # with this transformers/torch; the tolerance leaves room for a version that adds or reshapes a small op
    assert analytic == pytest.approx(counted, rel=0.01)


def test_flops_known_values_and_text_length():
    b32 = PRESETS["ViT-B-32"]
    # OpenCLIP's table gives 4.41 + 2.96 GMACs forward for ViT-B-32 (image + text): x2 FLOPs per MAC
    assert b32.vision_flops() / 2e9 == pytest.approx(4.41, rel=0.01)
    assert b32.text_flops() / 2e9 == pytest.approx(2.96, rel=0.01)
    assert b32.flops_per_sample() == b32.flops_per_sample(77) > b32.flops_per_sample(20)
    with pytest.raises(ValueError, match="text_tokens"):
        b32.flops_per_sample(78)


def test_preset_from_configs_round_trips():
    for p in PRESETS.values():
        again = Preset.from_configs(p.vision_config(), p.text_config(), name=p.name)
        assert again.flops_per_sample() == p.flops_per_sample()


def test_step_flops_counts_each_micro_batch_positions():
    p = PRESETS["tiny"]
    mask = torch.zeros(4, p.context_length, dtype=torch.long)
    mask[:, :5] = 1
    mask[0, :9] = 1  # longest caption: 9 positions
    mb = {"input_ids": torch.zeros_like(mask), "attention_mask": mask, "pixel_values": torch.zeros(4, 3, 32, 32)}
    assert step_flops(p, [mb], "longest") == 4 * p.flops_per_sample(9)
    assert step_flops(p, [mb, mb], "max_length") == 8 * p.flops_per_sample()


def test_matmul_peak_is_measured():
    tflops = measure_matmul_tflops(torch.float32, seconds=0.2)
    assert 1e-4 < tflops < 1e3
    assert matmul_dtype("fp32") is torch.float32
    assert matmul_dtype("bf16") is matmul_dtype("pure_bf16") is torch.bfloat16
    assert matmul_dtype("fp16") is torch.float16


def test_throughput_metrics_and_the_plot_panel():
    assert throughput_metrics(int(2e12), 4.0, Peak(1.0, "--peak-tflops")) == {"tflops_per_rank": 0.5, "mfu": 0.5}
    assert throughput_metrics(int(2e12), 4.0, Peak(None, "unknown on cuda")) == {"tflops_per_rank": 0.5}
    rows = [{"step": s, "loss": 1.0, "tau": 0.07, "lr": 1e-3, "samples_per_s": 10.0} for s in (1, 2, 3)]
    titles = [ax.get_title() for ax in M.training_figure(rows).axes]
    assert "MFU (model FLOPs / peak)" not in titles and "TFLOPS per rank" not in titles
    for r in rows:
        r.update(tflops_per_rank=0.05)
    assert "TFLOPS per rank" in [ax.get_title() for ax in M.training_figure(rows).axes]
    for r in rows:
        r.update(mfu=0.4)
    axes = {ax.get_title(): ax for ax in M.training_figure(rows).axes}
    assert list(axes)[3:5] == ["samples / s", "MFU (model FLOPs / peak)"]
    assert list(axes["MFU (model FLOPs / peak)"].lines[0].get_ydata()) == pytest.approx([0.4] * 3)


def test_peak_is_the_flag_else_measured_on_cpu_else_unknown():
    given = resolve_peak(989.0, "bf16", torch.device("cuda"))
    assert given.tflops == 989.0 and given.describe() == "989 TFLOPS (--peak-tflops)"
    unknown = resolve_peak(None, "bf16", torch.device("cuda"))
    assert unknown.tflops is None and "--peak-tflops" in unknown.describe()


@pytest.mark.parametrize("rows,prototypes,inner_steps", [(64, 128, 5), (16, 256, 3)])
def test_npn_flops_match_the_counter(rows, prototypes, inner_steps):
    """flops.npn_flops_per_step is what the NPN computes: FlopCounterMode over NPN.fit's T_u inner steps and the
    prediction of alpha."""
    from neuclip_ds.flops import npn_flops_per_step
    from neuclip_ds.npn import NPN

    dim, gen = 32, torch.Generator().manual_seed(0)
    npn = NPN(dim, num_prototypes=prototypes)
    img, txt = (torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=-1) for _ in range(2))
    tau, targets = torch.tensor([0.07]), torch.randn(2, rows, generator=gen)
    with FlopCounterMode(display=False) as counter:
        npn.fit(img, txt, targets[0], targets[1], tau, inner_steps)
        npn.predict(img, txt, tau)
    assert counter.get_total_flops() == npn_flops_per_step(rows, prototypes, dim, inner_steps)


def test_npn_share_is_per_rank_rows_when_sharded():
    from neuclip_ds.flops import describe_npn_share, npn_flops_share

    p = get_preset("ViT-B-32")
    kw = dict(per_rank_batch=256, prototypes=4096, inner_steps=10)
    sharded = [npn_flops_share(p, world_size=w, **kw) for w in (1, 8)]
    replicated = [npn_flops_share(p, world_size=w, parallel="replicated", **kw) for w in (1, 8)]
    assert sharded[0] == sharded[1] == replicated[0]  # E8 (b): each rank its own rows, whatever the world size
    assert replicated[1] == pytest.approx(8 * replicated[0])  # E8 (a): every rank the global batch
    line = describe_npn_share(p, world_size=8, parallel="sharded", **kw)
    assert f"{sharded[0]:.2%} of a step's model FLOPs here" in line and "ViT-B-16" in line
