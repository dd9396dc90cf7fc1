"""Zero-shot classification and image-text retrieval of a CLIP dual encoder on a held-out webdataset split.

Entry point ``neuclip-eval`` (also ``python -m neuclip_ds.evaluate``)::

    python -m neuclip_ds.evaluate --hf-dir DIR      --dataset-dir data/digits [--out results.json]
    python -m neuclip_ds.evaluate --checkpoint RUN  --dataset-dir data/digits [--out results.json]

``--checkpoint`` takes a trainer output dir (``RUN``, holding ``config.yaml`` and ``checkpoints/``), its
``checkpoints/`` dir (tag read from ``latest``) or one ``checkpoints/stepNNNNNNNN`` tag dir. ZeRO-1/2/3
checkpoints are consolidated to fp32 with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``; a
checkpoint without ZeRO optimizer shards (stage 0) is read from its ``mp_rank_00_model_states.pt``. The model
is rebuilt from the run's ``config.yaml`` (``preset``, ``loss`` -> SigLIP bias, ``init_tau``/``tau_min``/
``tau_max``, ``pretrained_hf``, ``tokenizer``) and loaded with ``load_state_dict(strict=True)``.

Metrics (all in [0, 1]; ``results`` is a flat dict)
    ``num_samples``                     pairs evaluated
    ``retrieval/image_to_text_R@k``     fraction of images whose own caption is among the k most similar texts
    ``retrieval/text_to_image_R@k``     the same from the text side; k in (1, 5, 10)
    ``zeroshot/<attribute>/top1|top5``  zero-shot accuracy per labelled attribute (classifier = mean of the
                                        normalized prompt-template embeddings per class, renormalized, as in
                                        OpenCLIP); k is clipped to the number of classes of that attribute
    ``zeroshot/mean/top1|top5``         mean over the attributes

Ties. A query's rank is the number of OTHER candidates whose similarity is at least that of the correct
candidate (0 = best), and a query counts as a hit at k when rank < k. Ties are thus resolved against the
correct candidate (a conservative score, independent of the data order): a degenerate model whose embeddings
all coincide scores ~0, not 100 % (``evaluate`` also warns when embeddings or class embeddings collapse), and
duplicate captions in a data set lower retrieval scores slightly rather than inflate them. Zero-shot top-k
uses the same rule over the class scores. "At least" means not lower by more than ``TIE_TOL`` = 1e-6
(similarities computed in float64): the same input encoded in float32 in batches of different shapes differs
by ~1e-7 (CPU kernels differ by batch shape), which must not decide a tie.

Evaluation runs in one process (no distributed gather); pass the model (``NeuCLIPEngine.model``, a DeepSpeed
engine's ``.module``; an object with a ``.module`` is unwrapped) rather than a DeepSpeed engine's forward.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import distributed
from .atomic import atomic_write
from .checkpoint import (
    CheckpointError,
    load_checkpoint_state_dict,
    model_from_state_dict,
    read_run_config,
    resolve_checkpoint,
)
from .data.tokenizer import trim_text_padding

if TYPE_CHECKING:
    from .data.tokenizer import TextTokenizer

RETRIEVAL_KS = (1, 5, 10)
ZEROSHOT_KS = (1, 5)
# Similarities closer than this are a tie (float32 encoding noise is ~1e-7); see "Ties" in the module docstring.
TIE_TOL = 1e-6


class EvalError(ValueError):
    """A problem with the evaluation inputs, reported by the CLI as one line (exit code 2)."""


# ------------------------------------------------------------------------------------------------------------
# Metrics on embeddings
# ------------------------------------------------------------------------------------------------------------
def retrieval_ranks(
    img_emb: torch.Tensor, txt_emb: torch.Tensor, *, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image->text ranks, text->image ranks), LongTensor[N] each; pair i is (img_emb[i], txt_emb[i]).

    rank = number of other candidates whose similarity is at least the true partner's (within ``TIE_TOL``;
    0 = retrieved first, ties count against). Similarities are dot products (the embeddings are expected to be
    L2-normalized), computed in float64.
    """
    if img_emb.ndim != 2 or txt_emb.ndim != 2 or img_emb.shape != txt_emb.shape:
        raise ValueError(
            f"retrieval: need two [N, d] embedding matrices of the same shape, got "
            f"{tuple(img_emb.shape)} and {tuple(txt_emb.shape)}"
        )
    img = img_emb.detach().double()
    txt = txt_emb.detach().double()
    n = img.shape[0]

    def ranks(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = []
        for a in range(0, n, chunk):
            s = q[a : a + chunk] @ c.T
            true = s.diagonal(a)
            out.append((s >= true[:, None] - TIE_TOL).sum(dim=1) - 1)  # minus the true partner itself
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    return ranks(img, txt), ranks(txt, img)


def retrieval_metrics(
    img_emb: torch.Tensor, txt_emb: torch.Tensor, ks: Sequence[int] = RETRIEVAL_KS
) -> dict[str, float]:
    """Recall@k both ways for N paired embeddings: {"image_to_text_R@1": .., "text_to_image_R@1": .., ...}.

    A query is a hit at k when fewer than k other candidates score at least as high as its partner (within
    ``TIE_TOL``): ties with the partner count against it, see "Ties" in the module docstring.
    """
    if img_emb.shape[0] == 0:
        raise ValueError("retrieval: no samples")
    i2t, t2i = retrieval_ranks(img_emb, txt_emb)
    out: dict[str, float] = {}
    for name, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = float((ranks < int(k)).float().mean())
    return out


@torch.no_grad()
def zero_shot_classifier(
    encode_text_fn: Callable[..., torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    tokenizer: TextTokenizer,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """[num_classes, d]: per class, the mean of the L2-normalized embeddings of every template filled with
    the class name, renormalized (OpenCLIP's ``build_zero_shot_classifier``).

    ``encode_text_fn(input_ids, attention_mask) -> [b, d]``; ``tokenizer(list_of_str) -> {"input_ids",
    "attention_mask"}`` (a ``TextTokenizer``); templates contain ``{}`` (or are callables of the class name).
    All prompts are encoded together in batches of ``batch_size``.
    """
    if not classnames:
        raise ValueError("zero-shot: no class names")
    if not templates:
        raise ValueError("zero-shot: no templates")
    texts = [t(name) if callable(t) else t.format(name) for name in classnames for t in templates]
    chunks = []
    for a in range(0, len(texts), batch_size):
        tok = tokenizer(texts[a : a + batch_size])
        ids, mask = trim_text_padding(tok["input_ids"], tok.get("attention_mask"))
        if device is not None:
            ids = ids.to(device)
            mask = mask.to(device) if mask is not None else None
        chunks.append(F.normalize(encode_text_fn(ids, mask).float(), dim=-1))
    emb = torch.cat(chunks).reshape(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def zero_shot_metrics(
    img_emb: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = ZEROSHOT_KS
) -> dict[str, float]:
    """{"top1": .., "top5": ..}: fraction of images whose label is among the top-k classes by similarity.

    k is clipped to the number of classes (``top5`` of a 3-class problem is top-3, i.e. 1.0); the rank of the
    true class counts the other classes scoring at least as high (ties count against).
    """
    labels = torch.as_tensor(labels).long().reshape(-1)
    if img_emb.shape[0] != labels.shape[0]:
        raise ValueError(f"zero-shot: {img_emb.shape[0]} embeddings but {labels.shape[0]} labels")
    if img_emb.shape[0] == 0:
        raise ValueError("zero-shot: no samples")
    num_classes = classifier.shape[0]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"zero-shot: labels outside [0, {num_classes})")
    scores = img_emb.detach().double() @ classifier.detach().double().T
    true = scores.gather(1, labels[:, None])
    ranks = (scores >= true - TIE_TOL).sum(dim=1) - 1  # minus the true class itself
    return {f"top{k}": float((ranks < min(int(k), num_classes)).float().mean()) for k in ks}


# ------------------------------------------------------------------------------------------------------------
# Embeddings of a loader
# ------------------------------------------------------------------------------------------------------------
def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def compute_embeddings(
    model: torch.nn.Module,
    loader: Iterable[dict],
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    *,
    progress: bool = True,
) -> dict:
    """Encode every batch of ``loader``: {"img": [N, d], "txt": [N, d], "labels": {attr: [N]}, "index": [N]}.

    Embeddings come back as float32 on the CPU. ``labels`` has the attributes present in every batch (empty
    when the data carry no labels). ``model`` is a ``CLIPDualEncoder`` (a wrapper with ``.module``, e.g. a
    DeepSpeed engine, is unwrapped); it is put in eval mode for the pass and its mode restored afterwards.
    """
    model = getattr(model, "module", model)
    device = torch.device(device)
    dtype = _param_dtype(model)
    was_training = model.training
    model.eval()
    img, txt, index = [], [], []
    labels: dict[str, list[torch.Tensor]] | None = None
    total = None
    if max_batches is not None:
        total = max_batches
    else:
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, desc="eval", unit="batch", dynamic_ncols=True, disable=not (progress and distributed.rank() == 0)
    )
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            pixels = batch["pixel_values"].to(device=device, dtype=dtype)
            ids, mask = trim_text_padding(batch["input_ids"], batch.get("attention_mask"))
            ids = ids.to(device)
            mask = mask.to(device) if mask is not None else None
            img.append(model.encode_image(pixels).float().cpu())
            txt.append(model.encode_text(ids, mask).float().cpu())
            n = pixels.shape[0]
            index.append(
                torch.as_tensor(batch["index"]).long().cpu()
                if "index" in batch
                else torch.full((n,), -1, dtype=torch.long)
            )
            batch_labels = batch.get("labels") or {}
            if labels is None:
                labels = {k: [] for k in batch_labels}
            for k in list(labels):
                if k in batch_labels:
                    labels[k].append(torch.as_tensor(batch_labels[k]).long().cpu())
                else:  # an attribute missing from one batch cannot be scored
                    del labels[k]
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if not img:
        raise EvalError("eval: the loader yielded no batch (empty or unreadable validation data)")
    return {
        "img": torch.cat(img),
        "txt": torch.cat(txt),
        "index": torch.cat(index),
        "labels": {k: torch.cat(v) for k, v in (labels or {}).items()},
    }


# ------------------------------------------------------------------------------------------------------------
# Evaluation of a model on a validation split
# ------------------------------------------------------------------------------------------------------------
def find_dataset_dir(*paths: str | os.PathLike | None) -> Path | None:
    """The first directory holding ``dataset.json`` among each path and its parents (up to 3 levels); None.

    Accepts shard patterns (``.../val/{00000..00001}.tar``): only the part before the first brace is used."""
    for p in paths:
        if not p:
            continue
        s = os.fspath(p).split("::")[0]
        for ch in "{*?":
            s = s.split(ch)[0]
        cand = Path(s)
        for _ in range(4):
            if (cand / "dataset.json").is_file():
                return cand
            if cand.parent == cand:
                break
            cand = cand.parent
    return None


def _warn_if_collapsed(what: str, x: torch.Tensor, *, pairwise: bool = False, atol: float = 1e-5) -> None:
    """Ties count against the correct candidate, so collapsed embeddings score ~0: say so. ``pairwise`` (small
    matrices only, e.g. a zero-shot classifier) also reports partly duplicated rows, whose classes lose every tie
    between them. Rank 0 only: under ZeRO-3 every rank evaluates the same split and would say it again."""
    if distributed.rank() != 0:
        return
    x = x.detach().double()
    if x.shape[0] < 2:
        return
    if float((x - x[0]).norm(dim=1).max()) <= atol:
        warnings.warn(
            f"eval: all {x.shape[0]} {what} are identical (collapsed model, or a tokenizer that does "
            f"not match the model); ties count against the correct candidate, so the metrics that rank them "
            f"are ~0 and meaningless",
            stacklevel=3,
        )
    elif pairwise:
        close = torch.cdist(x, x) <= atol
        close.fill_diagonal_(False)
        n_dup = int(close.any(dim=1).sum())
        if n_dup:
            warnings.warn(
                f"eval: {n_dup} of the {x.shape[0]} {what} coincide with another one; tied classes "
                f"count as misses, so the accuracy is pessimistic",
                stacklevel=3,
            )


def _load_tokenizer(tokenizer: TextTokenizer | str | os.PathLike, context_length: int) -> TextTokenizer:
    from .data.tokenizer import TextTokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        try:
            return TextTokenizer(tokenizer, context_length=context_length)
        except ValueError as e:
            raise EvalError(str(e)) from None
    return tokenizer


def evaluate(
    model: torch.nn.Module,
    *,
    val_data: str | Sequence[str],
    tokenizer: TextTokenizer | str | os.PathLike,
    image_size: int | None = None,
    dataset_dir: str | os.PathLike | None = None,
    classnames: Mapping[str, Sequence[str]] | None = None,
    templates: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Retrieval over the whole validation split and zero-shot accuracy for every attribute in ``classnames``.

    ``val_data``: shard spec for ``make_eval_loader``. ``tokenizer``: a ``TextTokenizer`` or a tokenizer dir
    (then loaded with the model's context length). ``image_size`` defaults to the model's. ``classnames`` /
    ``templates`` ({attribute: [...]}) default to the files of ``dataset_dir``, itself inferred from
    ``val_data`` when not given; without class names, only retrieval is computed. Returns a flat dict (see
    the module docstring); all values except ``num_samples`` lie in [0, 1].
    """
    from .data.loader import make_eval_loader

    module = getattr(model, "module", model)
    context_length = getattr(module, "context_length", 77)
    tok = _load_tokenizer(tokenizer, context_length)
    if image_size is None:
        image_size = module.image_size
    if classnames is None:
        specs = [val_data] if isinstance(val_data, (str, os.PathLike)) else val_data
        ddir = Path(dataset_dir) if dataset_dir is not None else find_dataset_dir(*specs)
        if ddir is not None and (ddir / "classnames.json").is_file():
            from .data.embedded import load_classnames, load_templates

            classnames = load_classnames(ddir)
            if templates is None and (ddir / "templates.json").is_file():
                templates = load_templates(ddir)
    templates = templates or {}
    try:
        loader = make_eval_loader(
            val_data, tokenizer=tok, image_size=image_size, batch_size=batch_size, rank=0, world_size=1, workers=workers
        )
    except FileNotFoundError as e:
        raise EvalError(f"--val-data: {e}") from None
    emb = compute_embeddings(module, loader, device, max_batches, progress=progress)

    _warn_if_collapsed("image embeddings", emb["img"])
    _warn_if_collapsed("text embeddings", emb["txt"])
    results: dict[str, float | int] = {"num_samples": int(emb["img"].shape[0])}
    results.update({f"retrieval/{k}": v for k, v in retrieval_metrics(emb["img"], emb["txt"]).items()})
    if classnames:
        device_t = torch.device(device)
        was_training = module.training
        module.eval()
        per_attr: list[dict[str, float]] = []
        try:
            for attr, names in classnames.items():
                if attr not in emb["labels"]:
                    if distributed.rank() == 0:  # every rank of a ZeRO-3 run finds the same
                        warnings.warn(
                            f"eval: no labels for attribute {attr!r} in the validation data; skipped", stacklevel=2
                        )
                    continue
                tmpl = list(templates.get(attr) or ["a photo of a {}."])
                clf = zero_shot_classifier(
                    module.encode_text, list(names), tmpl, tok, device=device_t, batch_size=batch_size
                ).cpu()
                _warn_if_collapsed(f"class embeddings of {attr!r}", clf, pairwise=True)
                m = zero_shot_metrics(emb["img"], clf, emb["labels"][attr])
                per_attr.append(m)
                results.update({f"zeroshot/{attr}/{k}": v for k, v in m.items()})
        finally:
            module.train(was_training)
        if per_attr:
            for k in per_attr[0]:
                results[f"zeroshot/mean/{k}"] = sum(m[k] for m in per_attr) / len(per_attr)
    return results


def format_table(results: Mapping[str, float | int]) -> str:
    """Readable text table of an ``evaluate`` result (metrics in percent)."""
    lines = [f"samples: {results.get('num_samples', '?')}"]
    retr = {k[len("retrieval/") :]: v for k, v in results.items() if k.startswith("retrieval/")}
    if retr:
        ks = sorted({int(k.rsplit("@", 1)[1]) for k in retr})
        lines.append("")
        lines.append(f"{'retrieval':<16}" + "".join(f"{'R@' + str(k):>9}" for k in ks))
        for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
            cells = [retr.get(f"{direction}_R@{k}") for k in ks]
            lines.append(f"{label:<16}" + "".join(f"{'-' if c is None else f'{100 * c:.2f}':>9}" for c in cells))
    zs: dict[str, dict[str, float]] = {}
    for k, v in results.items():
        if k.startswith("zeroshot/"):
            _, attr, metric = k.split("/", 2)
            zs.setdefault(attr, {})[metric] = v
    if zs:
        metrics = sorted({m for d in zs.values() for m in d}, key=lambda m: (len(m), m))
        lines.append("")
        lines.append(f"{'zero-shot':<16}" + "".join(f"{m:>9}" for m in metrics))
        for attr in sorted(zs, key=lambda a: (a == "mean", list(zs).index(a))):
            d = zs[attr]
            lines.append(
                f"{attr:<16}" + "".join(f"{'-' if d.get(m) is None else f'{100 * d[m]:.2f}':>9}" for m in metrics)
            )
    known = {"num_samples"}
    other = {k: v for k, v in results.items() if k not in known and not k.startswith(("retrieval/", "zeroshot/"))}
    if other:
        lines.append("")
        lines.extend(f"{k:<32}{v}" for k, v in other.items())
    return "\n".join(lines)


def write_results(results: Mapping, path_json: str | os.PathLike) -> Path:
    """Write ``results`` as JSON (atomic replace; parent dirs created); returns the path."""
    path = Path(path_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in results.items()}
    return atomic_write(path, json.dumps(clean, indent=2) + "\n")


def _is_tokenizer_dir(p: Path | None) -> bool:
    return p is not None and p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "vocab.json"))


def _resolve_path(value, base: Path | None) -> Path | None:
    """A path from a run config: as given, else relative to the run dir."""
    if not value:
        return None
    p = Path(value)
    if p.exists() or p.is_absolute() or base is None:
        return p
    return base / p if (base / p).exists() else p


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuclip-eval",
        description="Zero-shot classification and image-text retrieval of a CLIP model on held-out webdataset shards.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="a local transformers CLIPModel directory")
    src.add_argument("--checkpoint", help="a trainer output dir, its checkpoints/ dir or a step tag dir")
    p.add_argument("--tag", help="checkpoint tag (default: the one in 'latest')")
    p.add_argument("--val-data", help="validation shards (default: the data set's val split, or the run's --val-data)")
    p.add_argument(
        "--dataset-dir",
        help="embedded data set dir for class names, templates, tokenizer and val "
        "split (default: inferred from --val-data)",
    )
    p.add_argument("--tokenizer", help="HF tokenizer dir (default: the run's, the data set's, or the HF dir)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="dataloader workers")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", help="write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_cli(args: argparse.Namespace) -> dict:
    from .data.tokenizer import TextTokenizer

    if args.batch_size <= 0:
        raise EvalError(f"--batch-size: must be > 0, got {args.batch_size}")
    if args.max_batches is not None and args.max_batches <= 0:
        raise EvalError(f"--max-batches: must be > 0, got {args.max_batches}")
    dataset_dir = Path(args.dataset_dir) if args.dataset_dir else None
    if dataset_dir is not None and not (dataset_dir / "dataset.json").is_file():
        raise EvalError(f"--dataset-dir: {dataset_dir} is not a built data set (no dataset.json)")

    run_config: dict = {}
    run_dir = None
    ckpt = None
    if args.hf_dir:
        hf = Path(args.hf_dir)
        if not hf.is_dir():
            raise EvalError(f"--hf-dir: {hf} does not exist or is not a directory")
        if not (hf / "config.json").is_file():
            raise EvalError(f"--hf-dir: {hf} is not a transformers CLIPModel directory (no config.json)")
    else:
        ckpt = resolve_checkpoint(args.checkpoint, args.tag)
        run_dir = ckpt[2]
        run_config = read_run_config(run_dir, ckpt[0], ckpt[1])

    # validation data: flag > data set's val split > the run's val_data
    val_data = args.val_data
    if val_data is None and dataset_dir is not None:
        from .data.embedded import dataset_paths

        try:
            val_data = dataset_paths(dataset_dir)["val"]
        except ValueError as e:
            raise EvalError(f"--dataset-dir: {e}") from None
    if val_data is None and run_config.get("val_data"):
        val_data = str(_resolve_path(run_config["val_data"], run_dir))
    if val_data is None:
        raise EvalError("--val-data: no validation data given (pass --val-data or --dataset-dir)")
    from .data.shards import expand_shards

    try:
        expand_shards(val_data)
    except FileNotFoundError:
        raise EvalError(f"--val-data: no shard matches {val_data!r}") from None
    if dataset_dir is None:
        dataset_dir = find_dataset_dir(val_data)

    # tokenizer: flag > the run's > the data set's > the HF dir
    candidates = [
        args.tokenizer,
        _resolve_path(run_config.get("tokenizer"), run_dir),
        dataset_dir / "tokenizer" if dataset_dir else None,
        args.hf_dir,
    ]
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise EvalError(f"--tokenizer: {args.tokenizer} is not a directory")
    tok_path = next((Path(c) for c in candidates if c and _is_tokenizer_dir(Path(c))), None)
    if tok_path is None:
        raise EvalError("--tokenizer: no tokenizer found (pass --tokenizer or --dataset-dir)")

    if args.hf_dir:
        from .model import load_hf_clip

        try:
            model = load_hf_clip(args.hf_dir)
        except (ValueError, OSError) as e:
            raise EvalError(f"--hf-dir: {e}".splitlines()[0]) from None
        tok = _load_tokenizer(tok_path, model.context_length)
    else:
        # the context length is the preset's (or the fine-tuned HF model's); read it from the weights
        ckpt_dir, tag, _ = ckpt
        state = load_checkpoint_state_dict(ckpt_dir, tag)
        pos = state.get("text.text_model.embeddings.position_embedding.weight")
        tok = _load_tokenizer(tok_path, int(pos.shape[0]) if pos is not None else 77)
        model = model_from_state_dict(state, run_config, tok)
        del state
    if not isinstance(tok, TextTokenizer):  # pragma: no cover - _load_tokenizer with a path returns one
        raise EvalError("--tokenizer: could not load")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    classnames = templates = None
    if dataset_dir is not None and (dataset_dir / "classnames.json").is_file():
        from .data.embedded import load_classnames, load_templates

        classnames = load_classnames(dataset_dir)
        templates = load_templates(dataset_dir) if (dataset_dir / "templates.json").is_file() else None
    elif distributed.rank() == 0:
        print("neuclip-eval: no class names found (no --dataset-dir): retrieval only", file=sys.stderr)
    return evaluate(
        model,
        val_data=val_data,
        tokenizer=tok,
        image_size=model.image_size,
        dataset_dir=dataset_dir,
        classnames=classnames,
        templates=templates,
        batch_size=args.batch_size,
        device=device,
        max_batches=args.max_batches,
        workers=args.workers,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = run_cli(args)
    except (EvalError, CheckpointError) as e:
        print(f"neuclip-eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        print(f"results written to {write_results(results, args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
