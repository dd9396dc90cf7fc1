"""Presets, the dual encoder, the temperature parameter and loading a local HF CLIP directory."""

import math

import pytest
import torch
from transformers import CLIPModel

from neuclip_ds.model import build_model, load_hf_clip, model_geometry
from neuclip_ds.presets import PRESETS, get_preset

# total parameters of OpenCLIP's models (open_clip model configs, logit_scale included), in millions
OPENCLIP_PARAMS_M = {"ViT-B-32": 151.28, "ViT-B-16": 149.62, "ViT-L-14": 427.62, "ViT-H-14": 986.11}


@pytest.mark.parametrize("name", list(OPENCLIP_PARAMS_M))
def test_presets_match_openclip_sizes(name):
    with torch.device("meta"):
        model = build_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert n == pytest.approx(OPENCLIP_PARAMS_M[name], abs=0.01)
    assert model.image_size == 224 and model.context_length == 77


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"^preset:"):
        get_preset("ViT-Z-99")


def test_tiny_forward_normalized_with_shape1_tau():
    torch.manual_seed(0)
    model = build_model("tiny", init_tau=0.07)
    p = PRESETS["tiny"]
    out = model(torch.randn(4, 3, p.image_size, p.image_size), torch.randint(0, p.vocab_size, (4, p.context_length)))
    assert out["img"].shape == (4, p.embed_dim) and out["txt"].shape == (4, p.embed_dim)
    assert torch.allclose(out["img"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out["txt"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert model.temperature_parameter.shape == (1,) and out["tau"].shape == (1,)  # never 0-dim (ZeRO-2/3)
    assert all(prm.dim() > 0 for prm in model.parameters())
    assert "bias" not in out


def test_temperature_range_and_bias():
    """The range is checked at build time and kept by the engine after each step (tests/test_temperature.py)."""
    model = build_model("tiny", init_tau=0.07, tau_min=0.01, tau_max=0.5, with_bias=True)
    assert float(model.temperature().detach()) == pytest.approx(0.07)
    assert model.temperature_bounds() == pytest.approx((math.log(2.0), math.log(100.0)))
    assert model.logit_bias.shape == (1,)
    with pytest.raises(ValueError, match=r"^init_tau:"):
        build_model("tiny", init_tau=2.0, tau_max=1.0)
    with pytest.raises(ValueError, match=r"^tau_param:"):
        build_model("tiny", tau_param="exp")


def test_grad_checkpointing_gives_the_same_gradients():
    p = PRESETS["tiny"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, p.image_size, p.image_size, generator=g)
    ids = torch.randint(0, p.vocab_size, (3, p.context_length), generator=g)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny", grad_checkpointing=ckpt).train()
        out = model(x, ids)
        (out["img"] @ out["txt"].T / out["tau"]).sum().backward()
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None]))
        assert model.visual.is_activation_checkpointing == ckpt
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_load_local_hf_clip_directory(tmp_path):
    p = get_preset("tiny")
    config = build_model("tiny").hf_config()
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(torch.log(torch.tensor(1 / 0.05)))
    clip.save_pretrained(tmp_path)
    model = load_hf_clip(tmp_path).eval()
    x = torch.randn(2, 3, p.image_size, p.image_size)
    ids = torch.randint(0, p.vocab_size - 2, (2, p.context_length))
    ids[:, -1] = config.text_config.eos_token_id
    with torch.no_grad():
        ref = clip(input_ids=ids, pixel_values=x)  # CLIPModel returns normalized image/text embeds
        ref_img, ref_txt = ref.image_embeds, ref.text_embeds
        out = model(x, ids)
    assert torch.allclose(out["img"], ref_img, atol=1e-5)
    assert torch.allclose(out["txt"], ref_txt, atol=1e-5)
    assert float(out["tau"]) == pytest.approx(0.05, rel=1e-5)
    with pytest.raises(ValueError, match=r"^hf_dir:"):
        load_hf_clip(tmp_path / "missing")


@pytest.fixture(scope="module")
def hf_48(tmp_path_factory):
    """A CLIPModel directory whose sizes are not the tiny preset's: 48 px images, 20 text positions, 300 tokens."""
    from transformers import CLIPConfig

    out = tmp_path_factory.mktemp("hf48")
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 20, "vocab_size": 300, "eos_token_id": 299, "bos_token_id": 298,
                     "pad_token_id": 0},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 48, "patch_size": 16},
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(out)
    return out


def test_pretrained_hf_geometry_is_the_directorys(hf_48, tmp_path):
    from neuclip_ds.config import ConfigError, parse_config

    args = ["--synthetic-samples", "32", "--steps", "2", "--output-dir", str(tmp_path / "run")]
    assert parse_config(args).validate(world_size=1).geometry() == model_geometry("tiny")
    g = parse_config([*args, "--pretrained-hf", str(hf_48)]).validate(world_size=1).geometry()
    assert (g.image_size, g.context_length, g.vocab_size, g.eos_token_id) == (48, 20, 300, 299)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^--pretrained-hf: .*broken holds no readable CLIPModel config.json"):
        parse_config([*args, "--pretrained-hf", str(broken)]).validate(world_size=1)


def test_synthetic_run_fine_tunes_a_model_of_other_sizes(hf_48, tmp_path):
    """The data take the directory's sizes: with the tiny preset's 32 px images and 32 tokens the first step fails."""
    from neuclip_ds.launch import launch, summary

    out = tmp_path / "run"
    run = "--synthetic-samples 32 --steps 2 --global-batch-size 8 --npn-prototypes 8 --npn-inner-steps 1".split()
    launch([*run, "--pretrained-hf", str(hf_48), "--output-dir", str(out)], timeout=300)
    assert summary(out)["final"]["step"] == 2
