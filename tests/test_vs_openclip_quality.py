"""benchmarks/vs_openclip_quality.py: its pure helpers (no open_clip needed): the open_clip model config of a preset,
both command lines (neuclip_ds's parsed by neuclip_ds itself), open_clip's log parser, the lr comparison, the
evaluation adapter's padding and the result tables."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from neuclip_ds.config import parse_config
from neuclip_ds.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is not a package and the script imports its sibling _common: load it as a module
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("vs_openclip_quality", ROOT / "benchmarks" / "vs_openclip_quality.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_openclip_model_config_matches_the_tiny_preset():
    p = get_preset("tiny")
    cfg = bench.openclip_model_config(p, vocab_size=268, tokenizer_dir="/tok", pad_id=1)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    assert cfg["embed_dim"] == 64 and cfg["quick_gelu"] is False
    assert (v["image_size"], v["patch_size"], v["width"], v["layers"], v["mlp_ratio"]) == (32, 8, 128, 2, 2.0)
    assert v["width"] // v["head_width"] == p.vision_heads == 4
    assert (t["context_length"], t["vocab_size"], t["width"], t["heads"], t["layers"]) == (32, 268, 128, 4, 2)
    assert t["mlp_ratio"] == 4.0 and t["pool_type"] == "argmax" and t["hf_tokenizer_name"] == "/tok"
    assert t["pad_id"] == 1


def test_steps_per_epoch_drops_the_partial_batch():
    assert bench.steps_per_epoch(8000, 128) == 62
    with pytest.raises(ValueError):
        bench.steps_per_epoch(100, 128)


SCHEDULE = dict(batch=128, epochs=4, lr=2e-3, wd=0.1, warmup=20)  # both trainers'
NEUCLIP_RUN = dict(SCHEDULE, preset="tiny", dataset_dir="data/digits", ds_config="ds_configs/zero2.json")


def test_neuclip_command_line_parses_to_the_matched_settings():
    yaml_config = {"rho": 2.0, "npn_prototypes": 512}
    argv = bench.neuclip_args(**NEUCLIP_RUN, loss="neuclip", yaml_config=yaml_config, seed=1, extra="--lr 1e-3")
    cfg = parse_config(argv)
    assert (cfg.global_batch_size, cfg.epochs, cfg.wd, cfg.warmup, cfg.seed) == (128, 4, 0.1, 20, 1)
    assert cfg.lr == 1e-3  # --extra-neuclip-args come last and win
    assert (cfg.beta1, cfg.beta2, cfg.adam_eps, cfg.grad_clip) == (0.9, 0.98, 1e-6, 1.0)
    assert (cfg.init_tau, cfg.tau_min, cfg.tau_max, cfg.precision) == (0.07, 0.01, 1.0, "fp32")
    assert cfg.loss == "neuclip" and cfg.rho == 2.0 and cfg.npn_prototypes == 512
    assert cfg.npn_inner_steps == 10  # not in the yaml: neuclip_ds's default, passed explicitly
    assert cfg.text_padding == "max_length"
    assert cfg.tau_param == "log" and cfg.lr_tau == 2e-3 and cfg.lr_tau_schedule == "cosine"  # open_clip's
    assert bench.loss_args("mbcl", {"rho": 2.0}) == ["--loss", "mbcl"]


def test_differences_from_openclip_lists_what_extra_args_change():
    common = dict(NEUCLIP_RUN, loss="mbcl", yaml_config={}, seed=0)
    same = dict(SCHEDULE, seed=0)
    cfg = parse_config(bench.neuclip_args(**common))
    diffs = bench.differences_from_openclip(cfg, **same)
    assert diffs == []  # everything as open_clip's run
    diffs = bench.differences_from_openclip(parse_config(bench.neuclip_args(**common, extra="--wd 0.2")), **same)
    assert "--wd 0.2 (open_clip: 0.1)" in diffs
    diffs = bench.differences_from_openclip(
        parse_config(bench.neuclip_args(**common, extra="--lr-tau 1e-4 --tau-param raw")), **same
    )
    assert "--lr-tau 0.0001 (open_clip: the encoders' lr 0.002)" in diffs
    assert "--tau-param raw (open_clip: log)" in diffs


def test_openclip_command_line():
    argv = bench.openclip_args(**SCHEDULE, model="m", train_data="d/{0..1}.tar", num_samples=7936, seed=2, logs="/logs")
    flags = dict(zip(argv[::2], argv[1::2]))
    assert flags["--train-num-samples"] == "7936" and flags["--batch-size"] == "128"
    assert (flags["--beta1"], flags["--beta2"], flags["--eps"], flags["--grad-clip-norm"]) == (
        "0.9",
        "0.98",
        "1e-06",
        "1.0",
    )
    assert flags["--dataset-type"] == "webdataset" and flags["--precision"] == "fp32" and flags["--seed"] == "2"


def test_parse_openclip_log_and_lr_mismatch():
    log = (
        "2026-12-02,04:08:14 | INFO | Train Epoch: 0 [ 128/7936 (2%)] Data (t): 0.503 Batch (t): 1.176, "
        "108.871/s, 108.871/s/gpu LR: 0.000100 Logit Scale: 14.286 Contrastive_loss: 5.4223 (5.4223) "
        "Loss: 5.4223 (5.4223)\n"
        "2026-12-02,04:08:15 | INFO | Train Epoch: 0 [ 256/7936 (3%)] Data (t): 0.003 Batch (t): 0.336, "
        "381.260/s, 381.260/s/gpu LR: 0.000200 Logit Scale: 14.300 Contrastive_loss: 5.1000 (5.2611) "
        "Loss: 5.1000 (5.2611)\n"
    )
    rows = bench.parse_openclip_log(log)
    assert [r["samples"] for r in rows] == [128, 256] and rows[0]["samples_per_epoch"] == 7936
    assert rows[1]["lr"] == 2e-4 and rows[1]["logit_scale"] == 14.3 and rows[1]["loss"] == 5.1
    # neuclip_ds logs the lr after its scheduler step: row i is what step i + 1 uses
    assert bench.lr_mismatch([1e-4, 2e-4, 3e-4], [2e-4, 3e-4, 4e-4], 2e-3) == 0
    assert bench.lr_mismatch([1e-4, 2e-4], [2.2e-4], 2e-3) == pytest.approx(0.01)


class _FakeClip(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen = None

    def encode_image(self, x):
        return x.flatten(1)[:, :4] * 3

    def encode_text(self, ids):
        self.seen = ids
        return ids[:, :4].float() + 1


def test_adapter_pads_text_back_and_normalizes():
    clip = _FakeClip()
    ad = bench.OpenCLIPAdapter(clip, image_size=32, context_length=8, pad_id=1)
    assert (ad.image_size, ad.context_length) == (32, 8) and not hasattr(ad, "module")
    ids = torch.tensor([[5, 6, 7], [5, 7, 1]])
    out = ad.encode_text(ids, torch.ones_like(ids))
    assert clip.seen.shape == (2, 8) and clip.seen[:, 3:].eq(1).all() and torch.equal(clip.seen[:, :3], ids)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2))
    pixels = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ad.encode_image(pixels).norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError):
        bench.pad_to_context(torch.zeros(1, 9, dtype=torch.long), 8, 1)


def test_tables_pair_runs_by_seed():
    def run(trainer, loss, seed, tau, zs):
        return {
            "trainer": trainer,
            "loss": loss,
            "seed": seed,
            "tau": tau,
            "train_loss": 2.0,
            "wall_s": 10.0,
            "eval": {
                "retrieval/image_to_text_R@1": 0.01,
                "retrieval/text_to_image_R@1": 0.02,
                "zeroshot/digit/top1": zs,
                "zeroshot/mean/top1": zs,
            },
        }

    runs = [
        run("open_clip", "clip", 0, 0.07, 0.10),
        run("neuclip_ds", "mbcl", 0, 0.05, 0.15),
        run("open_clip", "clip", 1, 0.06, 0.20),
        run("neuclip_ds", "mbcl", 1, 0.04, 0.30),
    ]
    text = "\n".join(bench.tables(runs, ["digit"]))
    assert "| open_clip | 2 | 0.0650 ± 0.0071 | 1.00 ± 0.00 |" in text
    assert "Paired difference neuclip_ds mbcl − open_clip" in text
    assert "| 0 | -0.0200 | 0.00 | 0.00 | 5.00 | 5.00 |" in text
    assert "| mean ± std | -0.0200 ± 0.0000 | 0.00 ± 0.00 | 0.00 ± 0.00 | 7.50 ± 3.54 | 7.50 ± 3.54 |" in text


def test_mean_std():
    assert bench.mean_std([]) == "n/a" and bench.mean_std([1.234]) == "1.23"
    assert bench.mean_std([1.0, 3.0], digits=1) == f"2.0 ± {math.sqrt(2):.1f}"


def _openclip_state(
    width=128, embed=64, vocab=268, context=32, layers=2, grid=4, patch=8, vision_mlp=256, text_mlp=512
):
    """A random state dict with open_clip's CLIP names and the tiny preset's shapes."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    def blocks(prefix, mlp):
        out = {}
        for i in range(layers):
            b = f"{prefix}{i}."
            out.update(
                {
                    b + "ln_1.weight": r(width),
                    b + "ln_1.bias": r(width),
                    b + "ln_2.weight": r(width),
                    b + "ln_2.bias": r(width),
                    b + "attn.in_proj_weight": r(3 * width, width),
                    b + "attn.in_proj_bias": r(3 * width),
                    b + "attn.out_proj.weight": r(width, width),
                    b + "attn.out_proj.bias": r(width),
                    b + "mlp.c_fc.weight": r(mlp, width),
                    b + "mlp.c_fc.bias": r(mlp),
                    b + "mlp.c_proj.weight": r(width, mlp),
                    b + "mlp.c_proj.bias": r(width),
                }
            )
        return out

    state = {
        "token_embedding.weight": r(vocab, width),
        "positional_embedding": r(context, width),
        "ln_final.weight": r(width),
        "ln_final.bias": r(width),
        "text_projection": r(width, embed),
        "logit_scale": torch.tensor(2.6593),
        "visual.conv1.weight": r(width, 3, patch, patch),
        "visual.class_embedding": r(width),
        "visual.positional_embedding": r(grid * grid + 1, width),
        "visual.ln_pre.weight": r(width),
        "visual.ln_pre.bias": r(width),
        "visual.ln_post.weight": r(width),
        "visual.ln_post.bias": r(width),
        "visual.proj": r(width, embed),
    }
    state.update(blocks("transformer.resblocks.", text_mlp))
    state.update(blocks("visual.transformer.resblocks.", vision_mlp))
    return state


def test_openclip_to_hf_state_fills_a_tiny_clipmodel_exactly():
    from transformers import CLIPModel

    from neuclip_ds.model import build_model

    state = _openclip_state()
    hf_state = bench.openclip_to_hf_state(state)
    hf = CLIPModel(build_model("tiny", vocab_size=268, eos_token_id=267, bos_token_id=266, pad_token_id=1).hf_config())
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)  # shapes are checked by load_state_dict
    assert [k for k in missing if not k.endswith("position_ids")] == [] and unexpected == []
    w = 128
    fused = state["visual.transformer.resblocks.1.attn.in_proj_weight"]
    layer = hf.vision_model.encoder.layers[1].self_attn
    for i, proj in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):  # q, k, v in that order
        assert torch.equal(proj.weight, fused[i * w : (i + 1) * w])
    assert torch.equal(hf.text_projection.weight, state["text_projection"].t())  # x @ P  ==  Linear(P^T)
    assert torch.equal(hf.visual_projection.weight, state["visual.proj"].t())
    assert torch.equal(hf.text_model.encoder.layers[0].mlp.fc2.bias, state["transformer.resblocks.0.mlp.c_proj.bias"])
    assert float(hf.logit_scale.detach()) == pytest.approx(2.6593)


def test_openclip_to_hf_state_refuses_tensors_it_cannot_place():
    state = _openclip_state()
    state["visual.extra_token"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"visual\.extra_token"):
        bench.openclip_to_hf_state(state)
    del state["visual.extra_token"], state["visual.proj"]
    with pytest.raises(KeyError):
        bench.openclip_to_hf_state(state)
