"""neuclip-export: a 2-rank ZeRO-3 checkpoint -> transformers.CLIPModel directory with the trained embeddings; eval of
the exported model equals eval of the checkpoint and the in-training evaluation."""

import json

import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from neuclip_ds.checkpoint import load_checkpoint_model
from neuclip_ds.data.embedded import build_embedded_dataset
from neuclip_ds.data.loader import make_eval_loader
from neuclip_ds.data.tokenizer import TextTokenizer
from neuclip_ds.launch import launch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = root / "digits"
    build_embedded_dataset(data, seed=0, n_train=128, n_val=64, samples_per_shard=32)
    out = root / "run"
    launch(
        [
            "--dataset-dir",
            str(data),
            "--steps",
            "3",
            "--global-batch-size",
            "16",
            "--npn-prototypes",
            "32",
            "--npn-inner-steps",
            "2",
            "--ds-config",
            "ds_configs/zero3.json",
            "--output-dir",
            str(out),
            "--lr",
            "1e-3",
        ],
        nproc=2,
    )
    hf = root / "hf"
    launch(["--checkpoint", str(out), "--out", str(hf)], module="neuclip_ds.export")
    return data, out, hf


def test_exported_clipmodel_gives_the_trained_embeddings(trained):
    data, out, hf = trained
    clip = CLIPModel.from_pretrained(hf).eval()
    ours, _, _ = load_checkpoint_model(out, tokenizer=TextTokenizer(data / "tokenizer", context_length=32))
    tok = AutoTokenizer.from_pretrained(hf)
    batch = next(
        iter(
            make_eval_loader(
                str(data / "val" / "{00000..00001}.tar"),
                tokenizer=TextTokenizer(data / "tokenizer", context_length=32),
                image_size=32,
                batch_size=16,
            )
        )
    )
    hf_ids = tok(batch["caption"], padding="max_length", max_length=32, return_tensors="pt")
    assert torch.equal(hf_ids["input_ids"], batch["input_ids"])  # the exported tokenizer adds bos/eos itself
    with torch.no_grad():
        ref = clip(
            input_ids=hf_ids["input_ids"], attention_mask=hf_ids["attention_mask"], pixel_values=batch["pixel_values"]
        )
        img = ours.encode_image(batch["pixel_values"])
        txt = ours.encode_text(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(ref.image_embeds, img, atol=1e-5)
    assert torch.allclose(ref.text_embeds, txt, atol=1e-5)
    with torch.no_grad():
        expected = float(img[0] @ txt[0] / ours.temperature())
    assert float(ref.logits_per_image[0, 0]) == pytest.approx(expected, rel=1e-4)
    assert CLIPImageProcessor.from_pretrained(hf).crop_size["height"] == 32
    meta = json.loads((hf / "neuclip_export.json").read_text())
    assert meta["npn"] == "npn.safetensors" and (hf / "npn.safetensors").is_file()


def test_eval_of_export_equals_eval_of_checkpoint_and_training(trained, tmp_path):
    data, out, hf = trained
    launch(
        ["--hf-dir", str(hf), "--dataset-dir", str(data), "--out", str(tmp_path / "hf.json")],
        module="neuclip_ds.evaluate",
    )
    launch(["--checkpoint", str(out), "--out", str(tmp_path / "ckpt.json")], module="neuclip_ds.evaluate")
    from_hf = json.loads((tmp_path / "hf.json").read_text())
    from_ckpt = json.loads((tmp_path / "ckpt.json").read_text())
    in_training = json.loads((out / "eval_results.json").read_text())
    keys = [k for k in in_training if k.startswith(("retrieval/", "zeroshot/"))]
    assert len(keys) > 10
    for k in keys:
        assert from_hf[k] == pytest.approx(in_training[k], abs=1e-9), k
        assert from_ckpt[k] == pytest.approx(in_training[k], abs=1e-9), k


def test_export_bad_inputs(trained, tmp_path):
    _, out, hf = trained
    proc = launch(
        ["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x")], module="neuclip_ds.export", check=False
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("neuclip-export: error:")
    proc = launch(["--checkpoint", str(out), "--out", str(hf)], module="neuclip_ds.export", check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr
