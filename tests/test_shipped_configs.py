"""The ready configs under configs/ for 8 GPUs pass validation as an 8-rank run would see it: batch divisibility,
the DeepSpeed JSON and its ZeRO stage, precision, memory of the NPN, shard count for 8 ranks x their workers. The
paths they name are placeholders for the user's own: the test points them at files of the right kind here."""

import shutil
from pathlib import Path

import pytest
import yaml
from transformers import CLIPConfig, CLIPModel

from neuclip_ds.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
EIGHT_GPU_CONFIGS = {
    # config: (ZeRO stage, activation checkpointing)
    "vit-b-32-8gpu": (2, False),
    "vit-l-14-8xh100": (3, True),
    "vit-h-14-8xh100": (3, True),
    "finetune-clip-b-32": (2, False),
}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, default_digits):
    """Shards enough for 8 ranks x 8 workers, a tokenizer directory, and a small CLIPModel directory that holds
    that tokenizer (as a saved OpenAI/OpenCLIP model does), with an image size that is not the default preset's."""
    root = tmp_path_factory.mktemp("stand_ins")
    for i in range(64):
        shutil.copy(next((default_digits / "train").glob("*.tar")), root / f"{i:05d}.tar")
    tokenizer = default_digits / "tokenizer"
    hf = root / "clip"
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 48, "patch_size": 16},
        projection_dim=32,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(hf)
    for f in tokenizer.iterdir():
        shutil.copy(f, hf / f.name)
    return {"shards": str(root / "{00000..00063}.tar"), "tokenizer": str(tokenizer), "hf": str(hf)}


@pytest.mark.parametrize("name", sorted(EIGHT_GPU_CONFIGS))
def test_eight_gpu_config_validates_at_8_ranks(name, stand_ins, tmp_path):
    path = ROOT / "configs" / f"{name}.yaml"
    written = yaml.safe_load(path.read_text())
    args = ["--config", str(path), "--train-data", stand_ins["shards"], "--output-dir", str(tmp_path / "run")]
    if "val_data" in written:
        args += ["--val-data", stand_ins["shards"]]
    if "tokenizer" in written:
        args += ["--tokenizer", stand_ins["tokenizer"]]
    if "pretrained_hf" in written:
        args += ["--pretrained-hf", stand_ins["hf"]]
    cfg = parse_config(args).validate(world_size=8)

    stage, checkpointing = EIGHT_GPU_CONFIGS[name]
    assert cfg.global_batch_size == written["batch_size"] * 8 * cfg.ds.gradient_accumulation_steps
    assert cfg.ds.zero_stage == stage and cfg.grad_checkpointing is checkpointing
    assert cfg.precision == "bf16"
    if "pretrained_hf" in written:  # the tokenizer comes with the pretrained directory
        assert cfg.tokenizer == stand_ins["hf"]
        assert cfg.geometry().image_size == 48  # the data are made for the pretrained model, not --preset
