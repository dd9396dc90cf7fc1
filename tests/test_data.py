"""Tests of neuclip_ds.data: embedded data set, tokenizer, webdataset pipeline, bad input, data position."""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neuclip_ds.data.bad_samples import BadSampleTracker, BadSampleWarning, TooManyBadSamplesError
from neuclip_ds.data.embedded import (
    ATTRIBUTES,
    CLASSNAMES,
    TEMPLATES,
    build_embedded_dataset,
    dataset_paths,
    is_complete,
    split_sources,
)
from neuclip_ds.data.loader import make_eval_loader, make_train_loader
from neuclip_ds.data.tokenizer import TextTokenizer
from neuclip_ds.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform

N_TRAIN, N_VAL, PER_SHARD = 240, 60, 40  # 6 train shards, 2 val shards


# ------------------------------------------------------------------------------------------------ helpers
def read_tar(path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order (test-side reader; the pipeline under test uses webdataset)."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tf.extractfile(m).read()
    return out


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def all_samples(root: Path, split: str):
    return [s for p in sorted((root / split).glob("*.tar")) for s in read_tar(p)]


def run_epoch(loader):
    batches = list(loader)
    return batches, [k for b in batches for k in b["key"]]


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    build_embedded_dataset(root, seed=0, n_train=N_TRAIN, n_val=N_VAL, samples_per_shard=PER_SHARD)
    return root


@pytest.fixture(scope="module")
def tok(ds) -> TextTokenizer:
    return TextTokenizer(ds / "tokenizer", context_length=32)


# ------------------------------------------------------------------------------------------------ embedded
def test_build_is_deterministic_and_reused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ma = build_embedded_dataset(a, seed=3, n_train=90, n_val=30, samples_per_shard=40)
    mb = build_embedded_dataset(b, seed=3, n_train=90, n_val=30, samples_per_shard=40)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert Path("train/00002.tar") in files_a and Path("val/00000.tar") in files_a
    assert Path("tokenizer/tokenizer.json") in files_a and Path("dataset.json") in files_a
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between two builds"
    assert ma["splits"]["train"]["num_samples"] == 90 and ma["splits"]["train"]["num_shards"] == 3
    assert [f["num_samples"] for f in ma["splits"]["train"]["shard_files"]] == [40, 40, 10]
    assert not ma["reused"] and not mb["reused"]
    # tar members have fixed metadata
    with tarfile.open(a / "train/00000.tar") as tf:
        m = tf.getmembers()[0]
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
    # same params -> reused without touching the files
    mtime = (a / "train/00000.tar").stat().st_mtime_ns
    assert build_embedded_dataset(a, seed=3, n_train=90, n_val=30, samples_per_shard=40)["reused"]
    assert (a / "train/00000.tar").stat().st_mtime_ns == mtime
    # different params -> rebuilt
    assert not build_embedded_dataset(a, seed=4, n_train=90, n_val=30, samples_per_shard=40)["reused"]
    assert (a / "train/00000.tar").read_bytes() != (b / "train/00000.tar").read_bytes()
    # a half-built dir (no manifest) or a damaged shard is detected and rebuilt
    (b / "dataset.json").unlink()
    assert not is_complete(b)
    assert not build_embedded_dataset(b, seed=3, n_train=90, n_val=30, samples_per_shard=40)["reused"]
    data = (b / "train/00001.tar").read_bytes()
    (b / "train/00001.tar").write_bytes(data[: len(data) // 2])
    assert not is_complete(b)
    assert not build_embedded_dataset(b, seed=3, n_train=90, n_val=30, samples_per_shard=40)["reused"]
    assert (b / "train/00001.tar").read_bytes() == data


def test_cli_prints_what_it_built(tmp_path, capsys):
    from neuclip_ds.data.embedded import main

    assert main(["--out", str(tmp_path / "d"), "--n-train", "20", "--n-val", "10"]) == 0
    out = capsys.readouterr().out
    assert "train: 20 samples in 1 shards" in out and str(tmp_path / "d") in out


def test_captions_state_attributes_and_json(ds):
    from sklearn.datasets import load_digits

    targets = load_digits().target
    manifest = json.loads((ds / "dataset.json").read_text())
    assert json.loads((ds / "classnames.json").read_text()) == CLASSNAMES
    templates = json.loads((ds / "templates.json").read_text())
    assert templates == TEMPLATES and all(all(t.count("{}") == 1 for t in ts) for ts in templates.values())
    assert set(CLASSNAMES) == {"digit", "colour", "background", "scale"}
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        samples = all_samples(ds, split)
        assert len(samples) == n == manifest["splits"][split]["num_samples"]
        indices = []
        for key, files in samples:
            assert set(files) == {"jpg", "txt", "json"}
            meta = json.loads(files["json"])
            caption = files["txt"].decode()
            assert meta["key"] == key and meta["caption"] == caption and meta["split"] == split
            indices.append(meta["index"])
            assert meta["labels"]["digit"] == int(targets[meta["source_index"]])
            for attr in ATTRIBUTES:
                name = meta[attr]
                assert CLASSNAMES[attr][meta["labels"][attr]] == name
                assert re.search(rf"\b{re.escape(name)}\b", caption), (attr, name, caption)
                # no other class of the same attribute is stated
                others = [c for c in CLASSNAMES[attr] if c != name and c not in name]
                assert not any(re.search(rf"\b{re.escape(o)}\b", caption) for o in others), caption
            with Image.open(io.BytesIO(files["jpg"])) as im:
                assert im.size == (32, 32) and im.mode == "RGB"
                # bright digit on a dark background: one contrast polarity (embedded.py docstring)
                pixels = np.asarray(im.convert("L"), dtype=np.float32)
                assert pixels.max() > np.median(pixels) + 20
        assert indices == list(range(n))
    # every attribute class shows up in the train split
    metas = [json.loads(f["json"]) for _, f in all_samples(ds, "train")]
    for attr in ATTRIBUTES:
        assert {m[attr] for m in metas} == set(CLASSNAMES[attr])


def test_train_val_sources_disjoint(ds):
    train = {json.loads(f["json"])["source_index"] for _, f in all_samples(ds, "train")}
    val = {json.loads(f["json"])["source_index"] for _, f in all_samples(ds, "val")}
    assert train and val and not (train & val)
    tr, va = split_sources(0, 1797)
    assert not set(tr.tolist()) & set(va.tolist()) and len(tr) + len(va) == 1797
    assert train <= set(tr.tolist()) and val <= set(va.tolist())


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trip_and_specials(ds, tok):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    captions = [f["txt"].decode() for _, f in all_samples(ds, "train") + all_samples(ds, "val")]
    batch = tok(captions)
    assert batch["input_ids"].shape == (len(captions), 32) and batch["input_ids"].dtype == torch.long
    assert tok.truncated_count == 0
    assert tok.batch_decode(batch["input_ids"]) == captions  # exact: captions are lowercase, single-spaced
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert (ids[torch.arange(len(ids)), lengths - 1] == tok.eos_token_id).all()
    assert ((ids == tok.eos_token_id).sum(1) == 1).all()  # first eos == pooled position
    assert (ids[mask == 0] == tok.pad_token_id).all()
    assert tok.eos_token_id == tok.vocab_size - 1 and tok.eos_token_id != 2
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    # zero-shot prompts encode without unknown tokens
    unk = tok.tokenizer.unk_token_id
    prompts = [t.format(c) for a, ts in TEMPLATES.items() for t in ts for c in CLASSNAMES[a]]
    assert not (tok(prompts)["input_ids"] == unk).any()
    # loadable offline by transformers
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        hf = cls.from_pretrained(str(ds / "tokenizer"), local_files_only=True)
        assert hf.eos_token == "<|endoftext|>" and hf.bos_token == "<|startoftext|>" and hf.pad_token
        assert hf.eos_token_id == tok.eos_token_id
    # general text: lowercased, punctuation space-separated
    assert tok.decode(tok(["A Red  SEVEN, tilted!"])["input_ids"][0]) == "a red seven , tilted !"


def test_tokenizer_truncation_keeps_eos(ds):
    t = TextTokenizer(ds / "tokenizer", context_length=6)
    out = t(["a red seven", "a small red seven on a grey background", "seven"])
    assert t.truncated_count == 1
    ids = out["input_ids"]
    assert ids[1].tolist()[0] == t.bos_token_id and ids[1].tolist()[-1] == t.eos_token_id
    assert out["attention_mask"][1].tolist() == [1] * 6
    assert t.decode(ids[1]) == "a small red seven"
    assert ids[0, out["attention_mask"][0].sum() - 1] == t.eos_token_id
    t(["one two three four five six seven"])
    assert t.truncated_count == 2


def test_tokenizer_bad_path(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        TextTokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("not a tokenizer")
    with pytest.raises(ValueError, match="empty"):
        TextTokenizer(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ transforms
def test_transforms_shape_and_normalization():
    img = Image.new("RGB", (64, 48), (255, 0, 128))
    ev = ImageTransform(32, train=False)(img)
    assert ev.shape == (3, 32, 32) and ev.dtype == torch.float32
    expect = [(v / 255.0 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(ev.mean(dim=(1, 2)), torch.tensor(expect), atol=1e-2)
    # eval: resize shortest side + center crop keeps the middle of a wide image
    wide = np.zeros((32, 96, 3), dtype=np.uint8)
    wide[:, 32:64] = 255
    out = ImageTransform(32, train=False)(Image.fromarray(wide))
    assert torch.allclose(out, ImageTransform(32, train=False)(Image.new("RGB", (32, 32), (255, 255, 255))))
    import random

    tr = ImageTransform(32, train=True)
    a, b = tr(img, random.Random(1)), tr(img, random.Random(1))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w = tr.crop_params(64, 64, rng)
        assert top >= 0 and left >= 0 and top + h <= 64 and left + w <= 64
        assert 0.9 * 64 * 64 * 0.95 <= h * w <= 64 * 64
    grad = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
    crops = {tuple(tr(Image.fromarray(grad), random.Random(s))[0, 0, :3].tolist()) for s in range(5)}
    assert len(crops) > 1  # the crop is random


# ------------------------------------------------------------------------------------------------ pipeline
def test_batch_format_and_eval_loader(ds, tok):
    paths = dataset_paths(ds)
    loader = make_eval_loader(paths["val"], tokenizer=tok, image_size=32, batch_size=16)
    batches, keys = run_epoch(loader)
    assert keys == [k for k, _ in all_samples(ds, "val")]  # every sample once, in order
    assert [len(b["key"]) for b in batches] == [16, 16, 16, 12]  # batches span shards; last one partial
    b = batches[0]
    assert b["pixel_values"].shape == (16, 3, 32, 32) and b["pixel_values"].dtype == torch.float32
    assert b["input_ids"].shape == b["attention_mask"].shape == (16, 32)
    assert b["index"].dtype == torch.long and b["index"].tolist() == list(range(16))
    assert set(b["labels"]) == set(ATTRIBUTES) and b["labels"]["digit"].shape == (16,)
    assert tok.batch_decode(b["input_ids"]) == b["caption"]
    assert b["bad_samples"] == {} and b["num_truncated"] == 0
    # pixel statistics are CLIP-normalized values of real images
    assert -2.0 < b["pixel_values"].min() < 0 < b["pixel_values"].max() < 2.2


def test_glob_spec_reads_the_shards_validation_accepted(ds, tok):
    # run validation accepts local globs (config.py uses the same expansion): the loader must read them too
    kw = dict(tokenizer=tok, image_size=32, batch_size=8, num_samples=10**6, workers=0)
    braces = make_train_loader(str(ds / "train" / "{00000..00005}.tar"), **kw)
    urls, keys = braces.urls, run_epoch(braces)[1]
    spaced = f"{ds}/train/0000[0-2].tar :: {ds}/train/0000[3-5].tar"  # spaces around :: are dropped too
    for globbed in (make_train_loader(str(ds / "train" / "*.tar"), **kw), make_train_loader(spaced, **kw)):
        assert globbed.urls == urls and globbed.missing_shards == []
        assert run_epoch(globbed)[1] == keys


def test_missing_pattern_is_one_clear_error(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nothing"):
        make_train_loader(
            str(tmp_path / "nothing-{000..003}.tar"), tokenizer=tok, image_size=32, batch_size=4, num_samples=100
        )
    with pytest.raises(FileNotFoundError, match="zilch"):
        make_eval_loader(f"{tmp_path}/zilch.tar::{tmp_path}/zilch2.tar", tokenizer=tok, image_size=32, batch_size=4)


@pytest.fixture(scope="module")
def corrupt(ds, tmp_path_factory):
    """6 shards with one corruption of each kind (+ a missing shard in the list); returns (spec, good keys)."""
    root = tmp_path_factory.mktemp("corrupt")
    shards = [read_tar(ds / "train" / f"{i:05d}.tar") for i in range(6)]
    good = []
    # 0: truncated inside the .txt data of sample 7 -> samples 0..6 good, sample 7 is jpg-only
    src = (ds / "train" / "00000.tar").read_bytes()
    with tarfile.open(ds / "train" / "00000.tar") as tf:
        cut = next(m for m in tf.getmembers() if m.name == f"{shards[0][7][0]}.txt").offset_data + 3
    (root / "s0.tar").write_bytes(src[:cut])
    good += [k for k, _ in shards[0][:7]]
    # 1: a .jpg that is not an image;  2: a missing .txt;  3: an empty .txt;  4: a json without index
    damage = {1: ("jpg", b"this is not a jpeg"), 2: ("txt", None), 3: ("txt", b"  \n"), 4: ("json", None)}
    for i, (ext, data) in damage.items():
        samples = [(k, dict(f)) for k, f in shards[i]]
        k, files = samples[11]
        if ext == "json":
            meta = json.loads(files["json"])
            del meta["index"]
            files["json"] = json.dumps(meta).encode()
        elif data is None:
            del files[ext]
        else:
            files[ext] = data
        write_tar(root / f"s{i}.tar", samples)
        good += [key for key, _ in samples if key != k]
    write_tar(root / "s5.tar", shards[5])
    good += [k for k, _ in shards[5]]
    spec = f"{root}/s{{0..3}}.tar::{root}/missing.tar::{root}/s{{4..5}}.tar"
    expected = {
        "shard_error": 1,
        "missing_caption": 2,
        "decode_error": 1,
        "empty_caption": 1,
        "missing_index": 1,
        "missing_shard": 1,
    }
    return spec, good, expected


def test_bad_input_counted_and_good_samples_once_per_epoch(corrupt, tok):
    spec, good, expected = corrupt
    assert len(good) == 7 + 4 * 39 + 40
    for epoch in (0, 1):
        keys, bad, trackers = [], Counter(), []
        for rank in range(2):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BadSampleWarning)
                loader = make_train_loader(
                    spec,
                    tokenizer=tok,
                    image_size=32,
                    batch_size=8,
                    num_samples=10**6,
                    rank=rank,
                    world_size=2,
                    workers=2,
                    seed=5,
                    epoch=epoch,
                    shuffle_buffer=50,
                    shuffle_initial=10,
                )
                tracker = BadSampleTracker()
                for b in loader:
                    tracker.update(b)
                    keys += b["key"]
                    assert b["pixel_values"].shape[1:] == (3, 32, 32)
                    assert len(b["key"]) == b["input_ids"].shape[0] == b["index"].shape[0]
            assert loader.state_dict() == {"epoch": epoch + 1, "batches_in_epoch": 0}
            assert tracker.bad == loader.bad_sample_totals  # everything reached the batches
            bad.update(tracker.bad)
            trackers.append(tracker)
        assert len(keys) == len(set(keys)), "duplicates"
        assert sorted(keys) == sorted(good), "lost or extra samples"
        assert dict(bad) == expected
        total = sum(t.total for t in trackers)
        assert total == sum(expected.values()) == 7
        seen = sum(t.seen for t in trackers)
        assert seen == len(good) + 7


def test_bad_samples_warn_in_process_and_tracker_threshold(corrupt, tok):
    spec, good, expected = corrupt
    tracker = BadSampleTracker(max_fraction=0.5, min_seen=10)
    with pytest.warns(BadSampleWarning) as record:
        loader = make_train_loader(spec, tokenizer=tok, image_size=32, batch_size=16, num_samples=10**6, workers=0)
        for b in loader:
            tracker.update(b)
            tracker.check()
    messages = " ".join(str(w.message) for w in record)
    for reason in expected:
        assert reason in messages
    assert dict(tracker.bad) == expected and tracker.good == len(good)
    assert tracker.fraction == pytest.approx(7 / (len(good) + 7))
    with pytest.raises(TooManyBadSamplesError, match="decode_error=1"):
        tracker.check(0.01)
    metrics = tracker.as_dict()
    assert metrics["bad_samples"] == 7 and metrics["bad_samples/missing_caption"] == 2
    assert tracker.counts_vector()[0] == len(good) and sum(tracker.counts_vector()[1:]) == 7


def test_numeric_key_gives_index_without_json(tmp_path, ds, tok):
    samples = [
        (f"{1000 + i:09d}", {"jpg": f["jpg"], "txt": f["txt"]})
        for i, (_, f) in enumerate(read_tar(ds / "val" / "00000.tar")[:5])
    ]
    write_tar(tmp_path / "n.tar", samples)
    (b,) = list(make_eval_loader(str(tmp_path / "n.tar"), tokenizer=tok, image_size=32, batch_size=8))
    assert b["index"].tolist() == [1000, 1001, 1002, 1003, 1004] and "labels" not in b


@pytest.mark.parametrize("resampled", [False, True])
def test_data_position_restore_continues_identically(ds, tok, resampled):
    kw = dict(
        tokenizer=tok,
        image_size=32,
        batch_size=8,
        num_samples=N_TRAIN if not resampled else 160,
        rank=1,
        world_size=2,
        workers=2,
        seed=11,
        resampled=resampled,
        shuffle_buffer=40,
        shuffle_initial=10,
    )
    spec = str(ds / "train" / "{00000..00005}.tar")

    def sig(b):
        return (tuple(b["key"]), round(float(b["pixel_values"].sum()), 3), tuple(b["input_ids"].sum(1).tolist()))

    ref = make_train_loader(spec, **kw)
    ep0 = [sig(b) for b in ref]
    ep1 = [sig(b) for b in ref]  # the loader advanced to epoch 1 by itself
    assert ref.state_dict() == {"epoch": 2, "batches_in_epoch": 0}
    assert [s[0] for s in ep0] != [s[0] for s in ep1]  # reshuffled per epoch
    if resampled:
        assert len(ep0) == len(ep1) == len(ref) == 160 // 16
    else:
        for ep in (ep0, ep1):  # rank 1 reads 3 of the 6 shards (which ones depends on the epoch), each once
            keys = [k for s in ep for k in s[0]]
            assert len(keys) == len(set(keys)) == N_TRAIN // 2

    # interrupted run: consume 3 batches, checkpoint, build a fresh loader and continue
    run = make_train_loader(spec, **kw)
    run.set_epoch(0)
    it = iter(run)
    got = [sig(next(it)) for _ in range(3)]
    state = run.state_dict()
    assert state == {"epoch": 0, "batches_in_epoch": 3}
    del it
    resumed = make_train_loader(spec, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # a set_epoch at the top of the epoch loop keeps the restored position
    got += [sig(b) for b in resumed]
    assert got == ep0
    assert resumed.state_dict() == {"epoch": 1, "batches_in_epoch": 0}
    assert [sig(b) for b in resumed] == ep1
    # same seed, new loader, explicit epoch -> same batches; other seed -> other order
    again = make_train_loader(spec, **kw)
    again.set_epoch(1)
    assert [sig(b) for b in again] == ep1
    other = make_train_loader(spec, **dict(kw, seed=12))
    assert [sig(b)[0] for b in other] != [s[0] for s in ep0]


def test_num_samples_caps_a_non_resampled_epoch(ds, tok):
    spec = str(ds / "train" / "{00000..00005}.tar")
    loader = make_train_loader(spec, tokenizer=tok, image_size=32, batch_size=8, num_samples=100, workers=0)
    _batches, keys = run_epoch(loader)
    assert len(keys) == 104 and len(set(keys)) == 104  # stops after the batch that reaches 100
    assert len(loader) == 13 and loader.state_dict() == {"epoch": 1, "batches_in_epoch": 0}


def test_resampled_all_bad_shards_end_instead_of_hanging(tmp_path, ds, tok):
    samples = [(k, dict(f, jpg=b"garbage")) for k, f in read_tar(ds / "val" / "00000.tar")[:3]]
    write_tar(tmp_path / "bad.tar", samples)
    loader = make_train_loader(
        str(tmp_path / "bad.tar"), tokenizer=tok, image_size=32, batch_size=4, num_samples=40, resampled=True, workers=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        assert list(loader) == []
    assert loader.bad_sample_totals["decode_error"] == 3 * 12  # 2 * 1 shard + 10 tries, 3 samples each


# ------------------------------------------------------------------------------------------------ data faults
def with_index(files: dict[str, bytes], index: int) -> dict[str, bytes]:
    return dict(files, json=json.dumps(dict(json.loads(files["json"]), index=index)).encode())


def loader_counts(spec: str, tok, **kw) -> tuple[list[dict], Counter]:
    """One in-process epoch of an eval loader: (batches, bad-sample counts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        loader = make_eval_loader(spec, tokenizer=tok, image_size=32, batch_size=64, **kw)
        batches = list(loader)
    return batches, loader.bad_sample_totals


def test_out_of_range_index_is_counted_bad_index(tmp_path, ds, tok):
    """FastCLIP indexes its u tables by the sample index: one outside [0, dataset_size) is skipped and counted."""
    samples = read_tar(ds / "val" / "00000.tar")[:6]
    indices = [0, 1, 6, -1, 4, 5]  # 6 == dataset_size and -1 are out of range
    write_tar(tmp_path / "i.tar", [(k, with_index(f, i)) for (k, f), i in zip(samples, indices)])
    batches, bad = loader_counts(str(tmp_path / "i.tar"), tok, dataset_size=6)
    assert [i for b in batches for i in b["index"].tolist()] == [0, 1, 4, 5]
    assert bad == {"bad_index": 2}
    # without a data set size only the negative index is known to be wrong
    batches, bad = loader_counts(str(tmp_path / "i.tar"), tok)
    assert [i for b in batches for i in b["index"].tolist()] == [0, 1, 6, 4, 5] and bad == {"bad_index": 1}


def png16(levels: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 levels [h, w] (grey), [h, w, 2] (grey + alpha), [h, w, 3] (RGB) or [h, w, 4]."""
    import struct
    import zlib

    h, w = levels.shape[:2]
    channels = 1 if levels.ndim == 2 else levels.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = levels.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_png_is_scaled_not_saturated(tmp_path, ds, tok, channels):
    """A mid-grey 16-bit PNG decodes to mid-grey (PIL's convert("RGB") clips 16-bit grey levels to 255)."""
    grey = np.full((32, 32), 0x8080, dtype=np.uint16)  # 128 at 8 bits
    colour = [grey] * (3 if channels >= 3 else 1)
    alpha = [np.full_like(grey, 0xFFFF)] if channels in (2, 4) else []  # opaque
    levels = np.stack(colour + alpha, axis=-1) if channels > 1 else grey
    data = png16(levels)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == {1: "I;16", 2: "RGBA", 3: "RGB", 4: "RGBA"}[channels]  # what PIL makes of it
    key, files = read_tar(ds / "val" / "00000.tar")[0]
    files = {"png": data, "txt": files["txt"], "json": files["json"]}
    write_tar(tmp_path / "p.tar", [(key, files)])
    (b,), bad = loader_counts(str(tmp_path / "p.tar"), tok)
    expect = torch.tensor([(128 / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(3, 1, 1)
    assert not bad and torch.allclose(b["pixel_values"][0], expect.expand(3, 32, 32), atol=1e-5)


def test_16_bit_grey_image_objects_are_scaled():
    """The transform itself, for callers holding PIL images: 16-bit grey in both modes PIL uses for it."""
    expect = ImageTransform(8, train=False)(Image.new("RGB", (8, 8), (128, 128, 128)))
    grey = np.full((8, 8), 0x8080, dtype=np.uint16)
    for im in (Image.fromarray(grey), Image.fromarray(grey.astype(np.int32))):
        assert im.mode in ("I;16", "I")
        assert torch.allclose(ImageTransform(8, train=False)(im), expect)


def test_key_seen_twice_in_a_shard_is_counted_and_skipped(tmp_path, ds, tok):
    """The first sample of a key is kept; a later one (adjacent or not) is skipped and counted as duplicate_key.
    A shard read again (another epoch, resampling) is not a duplicate."""
    samples = read_tar(ds / "val" / "00000.tar")[:4]
    (a, fa), (b, fb), (c, fc), (d, fd) = samples
    shard = [(a, fa), (b, fb), (a, with_index(fb, 99)), (c, fc), (d, fd), (d, with_index(fc, 98))]
    write_tar(tmp_path / "d.tar", shard)
    write_tar(tmp_path / "e.tar", samples)  # the same keys again in another shard: not duplicates
    batches, bad = loader_counts(f"{tmp_path}/d.tar::{tmp_path}/e.tar", tok)
    keys = [k for bt in batches for k in bt["key"]]
    index = [i for bt in batches for i in bt["index"].tolist()]
    assert keys == [a, b, c, d] * 2 and index == [json.loads(f["json"])["index"] for _, f in samples] * 2
    assert bad == {"duplicate_key": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        loader = make_train_loader(
            str(tmp_path / "e.tar"),
            tokenizer=tok,
            image_size=32,
            batch_size=2,
            num_samples=40,
            resampled=True,
            workers=0,
        )
        assert len([k for bt in loader for k in bt["key"]]) == 40
    assert not loader.bad_sample_totals


# ------------------------------------------------------------------------------------------------ epoch length, devices
def test_drop_last_epoch_yields_exactly_len_batches(ds, tok):
    """200 of the 240 samples over 2 ranks, 16 per batch: len = 200 // 32 = 6 batches a rank, and each rank yields
    6 (its 100-sample cap alone would let a 7th through, out of step with the steps per epoch)."""
    spec = str(ds / "train" / "{00000..00005}.tar")
    for rank in range(2):
        loader = make_train_loader(
            spec, tokenizer=tok, image_size=32, batch_size=16, num_samples=200, rank=rank, world_size=2,
            drop_last=True,
        )  # fmt: skip
        for _epoch in range(2):
            batches, _ = run_epoch(loader)
            assert len(batches) == len(loader) == 6
            assert all(len(b["key"]) == 16 for b in batches)


def test_bad_sample_counts_are_all_reduced_on_the_runs_device(ds, tok, monkeypatch):
    """Under NCCL a CPU tensor has no backend: the counts go to the device the stream was given."""
    import torch.distributed as dist

    from neuclip_ds import distributed
    from neuclip_ds.data.stream import LoaderStream

    loader = make_train_loader(
        str(ds / "train" / "00000.tar"), tokenizer=tok, image_size=32, batch_size=8, num_samples=40
    )
    stream = LoaderStream(loader, accumulation=1, max_bad_fraction=0.5, device="meta")
    stream.next_step()
    seen = []

    class Reduced(Exception):
        pass

    def all_reduce(t, *args, **kwargs):
        seen.append(t.device)
        raise Reduced  # a meta tensor has no values to read back

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Reduced):
        stream.check_bad_samples()
    assert seen == [torch.device("meta")]


def test_shard_warnings_come_from_rank_0_only(ds, tok, tmp_path, monkeypatch):
    """Every rank finds the same missing shards and the same shortage: one warning for the run, not one per rank;
    each rank still counts its share of the missing shards."""
    from neuclip_ds import distributed

    spec = f"{ds / 'train' / '00000.tar'}::{tmp_path / 'missing.tar'}"
    kw = dict(tokenizer=tok, image_size=32, batch_size=8, num_samples=40, world_size=2)
    with pytest.warns(UserWarning) as record:
        make_train_loader(spec, rank=0, **kw)
    messages = " ".join(str(w.message) for w in record)
    assert "missing_shard" in messages and "some workers get no shard" in messages
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaders = [make_train_loader(spec, rank=r, **kw) for r in range(2)]
    assert [loader.bad_sample_totals["missing_shard"] for loader in loaders] == [1, 0]
