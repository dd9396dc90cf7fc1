"""neuclip-export: a 2-rank ZeRO-3 checkpoint -> transformers.CLIPModel directory with the trained embeddings; eval of
the exported model equals eval of the checkpoint and the in-training evaluation."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from neuclip_ds.checkpoint import load_checkpoint_model
from neuclip_ds.data.embedded import build_embedded_dataset
from neuclip_ds.data.loader import make_eval_loader
from neuclip_ds.data.tokenizer import TextTokenizer
from neuclip_ds.data.transforms import ImageTransform
from neuclip_ds.launch import cpu_env, launch, run_command

ROUNDTRIP = Path(__file__).parent / "scripts" / "hf_roundtrip.py"
# `make test-transformers4` points this at a transformers 4.x install: the round trip then runs under it
OTHER_TRANSFORMERS = os.environ.get("NEUCLIP_TRANSFORMERS_PATH")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = root / "digits"
    build_embedded_dataset(data, seed=0, n_train=128, n_val=64, samples_per_shard=32)
    out = root / "run"
    run = "--steps 3 --global-batch-size 16 --npn-prototypes 32 --npn-inner-steps 2 --ds-config ds_configs/zero3.json"
    launch(["--dataset-dir", str(data), *run.split(), "--output-dir", str(out), "--lr", "1e-3"], nproc=2)
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


def test_a_transformers_user_gets_the_trainers_embeddings(trained, tmp_path):
    """CLIPModel, AutoProcessor and the zero-shot pipeline on the export, in a process of their own (under
    transformers 4.x when NEUCLIP_TRANSFORMERS_PATH names one), give the ids, pixels, embeddings and
    probabilities of the trainer's own tokenizer, eval transform and model, on non-square images."""
    data, out, hf = trained
    env = cpu_env()
    if OTHER_TRANSFORMERS:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (OTHER_TRANSFORMERS, env.get("PYTHONPATH")) if p)
    result_path = tmp_path / "roundtrip.json"
    run_command([sys.executable, ROUNDTRIP, hf, result_path], env=env, timeout=600)
    got = json.loads(result_path.read_text())
    if OTHER_TRANSFORMERS:
        assert got["transformers"].startswith("4."), got["transformers"]
    else:
        assert got["transformers"] == transformers.__version__
    assert got["processor"] == "CLIPProcessor"

    spec = importlib.util.spec_from_file_location("hf_roundtrip", ROUNDTRIP)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tokenizer = TextTokenizer(data / "tokenizer", context_length=32)
    text = tokenizer(script.CAPTIONS)
    assert got["input_ids"] == [ids[m.bool()].tolist() for ids, m in zip(text["input_ids"], text["attention_mask"])]
    pixels = torch.stack([ImageTransform(32, train=False)(img) for img in script.images()])
    assert torch.equal(torch.tensor(got["pixel_values"]), pixels)  # the eval transform is CLIPImageProcessor's

    ours, _, _ = load_checkpoint_model(out, tokenizer=tokenizer)
    with torch.no_grad():
        img, txt = ours.encode_image(pixels), ours.encode_text(text["input_ids"], text["attention_mask"])
        probs = torch.softmax(img @ txt.T / ours.temperature(), dim=1)
    assert torch.allclose(torch.tensor(got["image_embeds"]), img, atol=1e-5)
    assert torch.allclose(torch.tensor(got["text_embeds"]), txt, atol=1e-5)
    for i, scores in enumerate(got["pipeline_scores"]):
        for j, caption in enumerate(script.CAPTIONS):
            assert scores[caption] == pytest.approx(float(probs[i, j]), abs=1e-4)


def test_exported_files_have_the_mode_of_a_plain_write(trained):
    """0666 less the umask (readable by others under the usual 022; private under 077), not the 0600 of the
    temporary files they were written as."""
    _, _, hf = trained
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in hf.iterdir() if p.is_file()}
    assert modes and all(int(m, 8) == 0o666 & ~umask for m in modes.values()), (oct(umask), modes)
