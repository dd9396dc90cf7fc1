"""Tests of neuclip_ds.evaluate: retrieval / zero-shot metrics, embeddings, evaluate(), HF and checkpoint loading,
the neuclip-eval command line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from neuclip_ds import checkpoint as C
from neuclip_ds import evaluate as E
from neuclip_ds.data.embedded import CLASSNAMES, TEMPLATES, build_embedded_dataset, dataset_paths
from neuclip_ds.data.loader import make_eval_loader
from neuclip_ds.data.tokenizer import TextTokenizer
from neuclip_ds.launch import launch
from neuclip_ds.model import build_model

N_VAL = 64


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    build_embedded_dataset(root, n_train=64, n_val=N_VAL, samples_per_shard=32)
    return root


@pytest.fixture(scope="module")
def tok(ds) -> TextTokenizer:
    return TextTokenizer(dataset_paths(ds)["tokenizer"], context_length=32)


def tiny_model(tok: TextTokenizer, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_model(
        "tiny",
        vocab_size=tok.vocab_size,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        **kwargs,
    ).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def results(model, ds, tok):
    return E.evaluate(
        model, val_data=dataset_paths(ds)["val"], tokenizer=tok, dataset_dir=ds, batch_size=32, progress=False
    )


def assert_same_results(a: dict, b: dict, tol: float = 1e-9) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=tol), k


# ------------------------------------------------------------------------------------------------ retrieval
def test_retrieval_identity_pairs_are_perfect():
    e = unit(torch.randn(20, 16, generator=torch.Generator().manual_seed(0)))
    m = E.retrieval_metrics(e, e.clone())
    assert set(m) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert all(v == 1.0 for v in m.values())


@pytest.mark.parametrize("n_right", [0, 3, 7, 10])
def test_retrieval_permutation_with_k_of_n_right(n_right):
    """img_i = e_i, txt_i = e_p(i) with p fixing exactly n_right of n=10 points: R@1 = n_right / n."""
    n = 10
    p = list(range(n))
    wrong = list(range(n_right, n))
    if wrong:  # a cyclic shift of the non-fixed points: no further fixed point (len(wrong) != 1 here)
        for a, b in zip(wrong, wrong[1:] + wrong[:1]):
            p[a] = b
    eye = torch.eye(n)
    m = E.retrieval_metrics(eye, eye[p])
    assert m["image_to_text_R@1"] == pytest.approx(n_right / n)
    assert m["text_to_image_R@1"] == pytest.approx(n_right / n)
    # a wrong pair scores 0 like n-2 other candidates (ties count against) and below one: rank n-1
    assert m["image_to_text_R@5"] == m["text_to_image_R@5"] == pytest.approx(n_right / n)
    i2t, _t2i = E.retrieval_ranks(eye, eye[p])
    assert i2t.tolist() == [0 if p[i] == i else n - 1 for i in range(n)]


def test_retrieval_known_ranks():
    """Hand-made scores: the true text of image i has exactly i better-scoring texts."""
    n = 12
    # txt_j = e_j; img_i scores the texts by a fixed preference order: its own text comes at position i
    img = torch.zeros(n, n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        order = [*others[:i], i, *others[i:]]  # best first
        for pos, j in enumerate(order):
            img[i, j] = float(n - pos)
    i2t, _ = E.retrieval_ranks(img, torch.eye(n))
    assert i2t.tolist() == list(range(n))
    m = E.retrieval_metrics(unit(img), torch.eye(n), ks=(1, 5, 10))
    assert m["image_to_text_R@1"] == pytest.approx(1 / n)
    assert m["image_to_text_R@5"] == pytest.approx(5 / n)
    assert m["image_to_text_R@10"] == pytest.approx(10 / n)


def test_retrieval_ties_count_against_the_true_partner():
    # all embeddings identical (a collapsed model): every candidate ties with the partner -> no hits at k <= 10
    v = unit(torch.randn(1, 512, generator=torch.Generator().manual_seed(1)))
    same = v.expand(50, 512).clone()
    assert all(x == 0.0 for x in E.retrieval_metrics(same, same.clone()).values())
    # duplicate captions: txt0 == txt1 == e0, img0 = e0, img1 = e1
    img = torch.eye(2)
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    i2t, t2i = E.retrieval_ranks(img, txt)
    assert i2t.tolist() == [1, 1]  # img0: txt1 ties its own txt0 at 1; img1: all scores 0, a tie with its own
    assert t2i.tolist() == [0, 1]  # txt1: img0 scores 1 > its own img1 at 0
    m = E.retrieval_metrics(img, txt, ks=(1,))
    assert m == {"image_to_text_R@1": 0.0, "text_to_image_R@1": 0.5}


def test_retrieval_float32_noise_is_a_tie_but_real_differences_are_not():
    g = torch.Generator().manual_seed(5)
    img = unit(torch.randn(2, 64, generator=g))
    txt = img[[0, 0]].clone()  # both texts are image 0's caption ...
    txt[0] += 1e-8 * torch.randn(64, generator=g)  # ... encoded in batches of different shape (noise ~1e-7)
    assert E.retrieval_ranks(img, txt)[1].tolist() == [0, 1]
    assert E.retrieval_ranks(img, unit(txt))[0].tolist() == [1, 1]  # two equal texts: a tie, counted against
    far = txt.clone()
    far[1] = unit(far[1] + 1e-3 * img[1])  # a real (if small) preference of img1 for its own text
    ranks = E.retrieval_ranks(img, far)[0].tolist()
    assert ranks[1] == 0 and E.TIE_TOL < 1e-4


def test_collapse_warnings():
    same = unit(torch.ones(5, 4))
    with pytest.warns(UserWarning, match="all 5 text embeddings are identical.*ties count against the correct"):
        E._warn_if_collapsed("text embeddings", same)
    clf = torch.eye(4)
    clf[3] = clf[2]
    with pytest.warns(UserWarning, match="2 of the 4 class embeddings.*count as misses"):
        E._warn_if_collapsed("class embeddings", clf, pairwise=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E._warn_if_collapsed("class embeddings", torch.eye(4), pairwise=True)


def test_retrieval_does_not_depend_on_pair_order():
    g = torch.Generator().manual_seed(2)
    img = unit(torch.randn(40, 8, generator=g))
    txt = unit(img + 0.8 * torch.randn(40, 8, generator=g))
    txt[5] = txt[6]  # a duplicate caption: a tie
    perm = torch.randperm(40, generator=g)
    assert E.retrieval_metrics(img, txt) == E.retrieval_metrics(img[perm], txt[perm])


def test_retrieval_chunking_and_errors():
    g = torch.Generator().manual_seed(3)
    img, txt = unit(torch.randn(30, 8, generator=g)), unit(torch.randn(30, 8, generator=g))
    a = E.retrieval_ranks(img, txt)
    b = E.retrieval_ranks(img, txt, chunk=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError):
        E.retrieval_metrics(img, txt[:5])
    with pytest.raises(ValueError):
        E.retrieval_metrics(img[:0], txt[:0])


# ------------------------------------------------------------------------------------------------ zero-shot
class FakeTokenizer:
    """text -> one id (its position in a vocabulary of all texts seen)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, texts):
        ids = torch.tensor([[self.vocab.setdefault(t, len(self.vocab))] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_zero_shot_classifier_is_the_renormalized_mean_of_normalized_templates():
    g = torch.Generator().manual_seed(4)
    table = torch.randn(100, 6, generator=g) * torch.rand(100, 1, generator=g) * 10  # unnormalized
    tok = FakeTokenizer()
    calls = []

    def encode(ids, mask):
        calls.append(ids.shape[0])
        return table[ids[:, 0]]

    classes, templates = ["cat", "dog", "emu"], ["a {}", "the {}", "a photo of a {}"]
    clf = E.zero_shot_classifier(encode, classes, templates, tok)
    assert clf.shape == (3, 6)
    for c, name in enumerate(classes):
        rows = torch.stack([unit(table[tok.vocab[t.format(name)]]) for t in templates])
        expected = unit(rows.mean(0))
        assert torch.allclose(clf[c], expected, atol=1e-6)
    assert torch.allclose(clf.norm(dim=1), torch.ones(3), atol=1e-6)
    # batching the prompts does not change the result
    clf2 = E.zero_shot_classifier(encode, classes, templates, tok, batch_size=2)
    assert torch.allclose(clf, clf2) and calls[-5:] == [2, 2, 2, 2, 1]
    with pytest.raises(ValueError):
        E.zero_shot_classifier(encode, [], templates, tok)


def test_zero_shot_metrics_known_answers_and_clipping():
    clf = torch.eye(3)  # class c = e_c
    img = unit(
        torch.tensor(
            [
                [1.0, 0.1, 0.0],  # -> 0, 2nd is 1
                [0.2, 1.0, 0.3],  # -> 1, then 2, then 0
                [0.0, 0.5, 1.0],  # -> 2
                [0.9, 1.0, 0.0],
            ]
        )
    )  # -> 1, then 0
    labels = torch.tensor([0, 0, 2, 0])
    m = E.zero_shot_metrics(img, clf, labels, ks=(1, 2, 5))
    assert m["top1"] == pytest.approx(2 / 4)
    assert m["top2"] == pytest.approx(3 / 4)  # sample 1 has label 0 at rank 3
    assert m["top5"] == 1.0  # clipped to top-3 of 3 classes
    # a tie between the true class and another class counts against it (but is within top-2)
    tie = unit(torch.tensor([[1.0, 1.0, 0.0]]))
    assert E.zero_shot_metrics(tie, clf, torch.tensor([1]), ks=(1, 2)) == {"top1": 0.0, "top2": 1.0}
    assert E.zero_shot_metrics(tie, clf, torch.tensor([2]))["top1"] == 0.0
    with pytest.raises(ValueError):
        E.zero_shot_metrics(img, clf, torch.tensor([0, 1, 2, 3]))  # label 3 of 3 classes
    with pytest.raises(ValueError):
        E.zero_shot_metrics(img, clf, torch.tensor([0, 1]))


def test_collapse_warnings_come_from_rank_0_only(monkeypatch):
    import warnings

    monkeypatch.setattr(E.distributed, "rank", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E._warn_if_collapsed("text embeddings", unit(torch.ones(5, 4)))


# ------------------------------------------------------------------------------------------------ embeddings
def test_compute_embeddings_matches_direct_encoding(model, ds, tok):
    loader = make_eval_loader(dataset_paths(ds)["val"], tokenizer=tok, image_size=32, batch_size=24)
    batches = list(loader)
    model.train()  # restored afterwards
    emb = E.compute_embeddings(model, batches, "cpu", progress=False)
    assert model.training
    model.eval()
    assert emb["img"].shape == (N_VAL, 64) and emb["txt"].shape == (N_VAL, 64)
    assert sorted(emb["index"].tolist()) == list(range(N_VAL))
    assert set(emb["labels"]) == set(CLASSNAMES)
    with torch.no_grad():
        assert torch.allclose(emb["img"][:24], model.encode_image(batches[0]["pixel_values"]), atol=1e-5)
        assert torch.allclose(
            emb["txt"][:24], model.encode_text(batches[0]["input_ids"], batches[0]["attention_mask"]), atol=1e-5
        )
    assert torch.equal(emb["labels"]["digit"][:24], batches[0]["labels"]["digit"])
    assert torch.allclose(emb["img"].norm(dim=1), torch.ones(N_VAL), atol=1e-5)

    class Engine:  # a DeepSpeed engine exposes the model as .module
        module = model

    two = E.compute_embeddings(Engine(), batches, "cpu", max_batches=2, progress=False)
    assert two["img"].shape[0] == 48 and torch.allclose(two["img"], emb["img"][:48], atol=1e-6)
    with pytest.raises(E.EvalError):
        E.compute_embeddings(model, [], "cpu", progress=False)


# ------------------------------------------------------------------------------------------------ evaluate
def test_evaluate_end_to_end(results, model, ds, tok, tmp_path):
    expected = {"num_samples"} | {
        f"retrieval/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)
    }
    expected |= {f"zeroshot/{a}/top{k}" for a in [*list(CLASSNAMES), "mean"] for k in (1, 5)}
    assert set(results) == expected
    assert results["num_samples"] == N_VAL
    for k, v in results.items():
        if k != "num_samples":
            assert isinstance(v, float) and 0.0 <= v <= 1.0, (k, v)
    # top5 of attributes with <= 5 classes is clipped to all classes
    assert results["zeroshot/scale/top5"] == results["zeroshot/background/top5"] == 1.0
    assert results["zeroshot/mean/top1"] == pytest.approx(
        sum(results[f"zeroshot/{a}/top1"] for a in CLASSNAMES) / len(CLASSNAMES)
    )

    # the same numbers from the parts (retrieval over all pairs, classifier from the data set's templates)
    emb = E.compute_embeddings(
        model, make_eval_loader(dataset_paths(ds)["val"], tokenizer=tok, image_size=32, batch_size=16), progress=False
    )
    for k, v in E.retrieval_metrics(emb["img"], emb["txt"]).items():
        assert results[f"retrieval/{k}"] == pytest.approx(v)
    clf = E.zero_shot_classifier(model.encode_text, CLASSNAMES["digit"], TEMPLATES["digit"], tok)
    assert results["zeroshot/digit/top1"] == pytest.approx(
        E.zero_shot_metrics(emb["img"], clf, emb["labels"]["digit"])["top1"]
    )

    # classnames/templates found from val_data alone (dataset dir inferred), tokenizer given as a path
    again = E.evaluate(
        model,
        val_data=dataset_paths(ds)["val"],
        tokenizer=dataset_paths(ds)["tokenizer"],
        batch_size=64,
        progress=False,
    )
    assert_same_results(results, again)
    # explicit subset of classnames, max_batches
    part = E.evaluate(
        model,
        val_data=dataset_paths(ds)["val"],
        tokenizer=tok,
        classnames={"digit": CLASSNAMES["digit"]},
        templates={"digit": ["{}"]},
        batch_size=16,
        max_batches=2,
        progress=False,
    )
    assert part["num_samples"] == 32 and "zeroshot/digit/top1" in part and "zeroshot/colour/top1" not in part

    table = E.format_table(results)
    assert "image -> text" in table and "digit" in table and "R@10" in table and "samples: 64" in table
    out = E.write_results(results, tmp_path / "sub" / "results.json")
    assert json.loads(out.read_text()) == results


def test_evaluate_takes_a_list_of_shards(results, model, ds, tok):
    """The data set's class names are found from the first shard of a list as from a pattern."""
    shards = [str(p) for p in sorted((ds / "val").glob("*.tar"))]
    assert len(shards) == 2
    listed = E.evaluate(model, val_data=shards, tokenizer=tok, batch_size=32, progress=False)
    assert_same_results(listed, results)


def test_evaluate_missing_val_data(model, tok, tmp_path):
    with pytest.raises(E.EvalError, match="--val-data"):
        E.evaluate(model, val_data=str(tmp_path / "nope" / "{00000..00001}.tar"), tokenizer=tok, progress=False)


# ------------------------------------------------------------------------------------------------ HF directory
def save_as_hf_clip(model, out_dir: Path) -> Path:
    from transformers import CLIPModel

    clip = CLIPModel(model.hf_config())
    state = {
        **model.visual.state_dict(),
        **model.text.state_dict(),
        "logit_scale": torch.log(1.0 / model.temperature().detach()).reshape(()),
    }
    missing, unexpected = clip.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("position_ids")]
    clip.save_pretrained(out_dir)
    return out_dir


def test_hf_dir_gives_the_same_results_as_the_model(results, model, ds, tmp_path, capsys):
    hf = save_as_hf_clip(model, tmp_path / "hf")
    out = tmp_path / "results.json"
    paths = ["--hf-dir", str(hf), "--dataset-dir", str(ds), "--out", str(out)]
    rc = E.main([*paths, *"--batch-size 32 --device cpu --no-progress".split()])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "text -> image" in printed
    assert_same_results(json.loads(out.read_text()), results, tol=1e-6)


# ------------------------------------------------------------------------------------------------ checkpoints
def write_run(run: Path, state: dict, config: dict, *, zero: bool = False) -> Path:
    """A trainer-like output dir with a non-ZeRO DeepSpeed checkpoint (module weights in mp_rank_00)."""
    tag_dir = run / "checkpoints" / "step00000004"
    tag_dir.mkdir(parents=True)
    torch.save({"module": state}, tag_dir / "mp_rank_00_model_states.pt")
    (run / "checkpoints" / "latest").write_text("step00000004")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_model_from_state_dict_reads_a_raw_tau_checkpoint(tok):
    """Runs before the log parametrization stored tau itself as `tau`: still loadable for eval and export."""
    src = tiny_model(tok, seed=5, init_tau=0.05, tau_param="raw")
    m = C.model_from_state_dict(src.state_dict(), {"preset": "tiny", "loss": "neuclip"}, tok)
    assert m.tau_param == "raw" and float(m.temperature().detach()) == pytest.approx(0.05)


def test_model_from_state_dict_round_trip(tok):
    src = tiny_model(tok, seed=5, with_bias=True, init_tau=0.05)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    cfg = {
        "preset": "tiny",
        "loss": "siglip",
        "init_tau": 0.07,
        "tau_min": 0.01,
        "tau_max": 1.0,
        "tokenizer": None,
        "pretrained_hf": None,
    }
    m = C.model_from_state_dict(state, cfg, tok)
    assert m.logit_bias is not None and float(m.temperature().detach()) == pytest.approx(0.05)
    assert m.text.config.eos_token_id == tok.eos_token_id
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the loss decides about logit_bias: a non-SigLIP config does not accept these weights (strict)
    with pytest.raises(C.CheckpointError, match="do not match"):
        C.model_from_state_dict(state, dict(cfg, loss="neuclip"), tok)
    # a run without tokenizer (synthetic data, preset vocabulary): warn, build with the checkpoint's vocabulary
    preset_vocab = build_model("tiny").state_dict()
    with pytest.warns(UserWarning, match="rows"):
        m2 = C.model_from_state_dict(preset_vocab, dict(cfg, loss="neuclip"), tok)
    assert m2.text.config.vocab_size == 1024
    with pytest.raises(C.CheckpointError, match="tokenizer"):
        C.model_from_state_dict(preset_vocab, dict(cfg, loss="neuclip", tokenizer="some/tok"), tok)


def test_checkpoint_without_zero_shards_and_path_forms(model, results, ds, tok, tmp_path):
    run = write_run(
        tmp_path / "run",
        {k: v.clone() for k, v in model.state_dict().items()},
        {
            "preset": "tiny",
            "loss": "mbcl",
            "tokenizer": dataset_paths(ds)["tokenizer"],
            "val_data": dataset_paths(ds)["val"],
        },
    )
    for path in (run, run / "checkpoints", run / "checkpoints" / "step00000004"):
        ckpt_dir, tag, run_dir = C.resolve_checkpoint(path)
        assert (ckpt_dir, tag, run_dir) == (run / "checkpoints", "step00000004", run)
    loaded, cfg, _ = C.load_checkpoint_model(run, tokenizer=tok)
    assert cfg["loss"] == "mbcl"
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    # CLI: val data and tokenizer from the run config, class names from the data set found next to the shards
    out = tmp_path / "r.json"
    assert (
        E.main(["--checkpoint", str(run / "checkpoints"), "--out", str(out), "--no-progress", "--batch-size", "32"])
        == 0
    )
    assert_same_results(json.loads(out.read_text()), results, tol=1e-6)


DS_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    import torch, torch.distributed as dist
    run, tok_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + os.path.join(run, "pg_init"), rank=0, world_size=1)
    import deepspeed
    from neuclip_ds.data.tokenizer import TextTokenizer
    from neuclip_ds.model import build_model
    tok = TextTokenizer(tok_dir, 32)
    torch.manual_seed(0)
    m = build_model("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                    bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2}}
    eng, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(m.parameters(), lr=1e-3), config=cfg)
    eng.save_checkpoint(os.path.join(run, "checkpoints"), tag="step00000001", save_latest=True)
    dist.destroy_process_group()
""")


def test_deepspeed_zero2_checkpoint_end_to_end(model, results, ds, tmp_path, capsys):
    """A real ZeRO-2 checkpoint (DeepSpeed on CPU/gloo in a subprocess, ~7 s) -> --checkpoint evaluates the
    same weights as the in-memory model (both are torch.manual_seed(0) tiny models)."""
    run = tmp_path / "run"
    run.mkdir()
    script = tmp_path / "make_ckpt.py"
    script.write_text(DS_SCRIPT)
    proc = launch([str(run), dataset_paths(ds)["tokenizer"]], script=str(script), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any((run / "checkpoints" / "step00000001").glob("*optim_states.pt"))
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {"preset": "tiny", "loss": "neuclip", "init_tau": 0.07, "tau_min": 0.01, "tau_max": 1.0, "tokenizer": None}
        )
    )
    loaded, _, _ = C.load_checkpoint_model(run, tokenizer=TextTokenizer(dataset_paths(ds)["tokenizer"], 32))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    out = tmp_path / "r.json"
    paths = ["--checkpoint", str(run), "--dataset-dir", str(ds), "--out", str(out)]
    assert E.main([*paths, *"--no-progress --batch-size 32".split()]) == 0
    assert "digit" in capsys.readouterr().out
    assert_same_results(json.loads(out.read_text()), results, tol=1e-6)


# ------------------------------------------------------------------------------------------------ CLI errors
def one_line_error(capsys, argv, match):
    assert E.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("neuclip-eval: error:") and match in err[0], err


def test_cli_errors(ds, tmp_path, capsys, model):
    one_line_error(capsys, ["--hf-dir", str(tmp_path / "missing"), "--dataset-dir", str(ds)], "--hf-dir")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["--hf-dir", str(tmp_path / "empty"), "--dataset-dir", str(ds)], "config.json")
    one_line_error(capsys, ["--checkpoint", str(tmp_path / "missing")], "does not exist")
    one_line_error(capsys, ["--checkpoint", str(tmp_path / "empty")], "not a DeepSpeed checkpoint")
    hf = save_as_hf_clip(model, tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bar
    one_line_error(capsys, ["--hf-dir", str(hf), "--val-data", str(tmp_path / "val/{00000..00003}.tar")], "--val-data")
    one_line_error(capsys, ["--hf-dir", str(hf)], "no validation data")
    one_line_error(capsys, ["--hf-dir", str(hf), "--dataset-dir", str(tmp_path / "empty")], "--dataset-dir")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "dataset.json").write_text('{"name": "other"}')
    one_line_error(capsys, ["--hf-dir", str(hf), "--dataset-dir", str(tmp_path / "foreign")], "manifest ('other'")
    one_line_error(
        capsys,
        ["--hf-dir", str(hf), "--val-data", dataset_paths(ds)["val"], "--tokenizer", str(tmp_path / "notok")],
        "--tokenizer",
    )
    with pytest.raises(SystemExit):  # argparse: exactly one of --hf-dir / --checkpoint
        E.main(["--dataset-dir", str(ds)])
    capsys.readouterr()


def test_module_entry_point_help():
    proc = launch(["--help"], module="neuclip_ds.evaluate", timeout=120, check=False)
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout and "--hf-dir" in proc.stdout
