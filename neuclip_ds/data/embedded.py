"""Embedded default data set: coloured handwritten digits with attribute captions, built offline.

The source images are scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1797 real 8x8
greyscale digits shipped inside the scikit-learn package, so nothing is downloaded). Each sample renders one
source digit, centred (jittered by a pixel), onto a 32x32 RGB canvas with builder-chosen attributes and a caption
that states all of them::

    digit       zero .. nine                      (the real label of the source image)
    colour      red green blue yellow purple orange            (bright)
    background  black grey brown navy                          (dark)
    scale       small (18 px) / large (26 px)

    e.g. "a small red seven on a grey background"

Why these choices (the task must teach the digit itself, docs/data.md):
- every digit is bright on a dark background, so its strokes have one contrast polarity: with light and dark
  backgrounds mixed, the tiny preset's vision tower barely learned the digit even from digit labels; with dark ones
  it does (benchmarks/digit_probe.py);
- the attributes other than the digit form 48 combinations, so in a batch of 128 every pair shares all of them
  with ~2.7 other pairs that only the digit tells apart: the contrastive loss needs the digit. Position and
  rotation are not attributes: they would make the other attributes nearly unique per batch, and models would
  ignore the digit;
- 480 attribute combinations over 2,000 val captions (~4 per combination) keep retrieval R@1 meaningful.

Captions use one of four phrasing templates; they are lowercase words separated by single spaces, without
punctuation (so the embedded tokenizer round-trips them exactly).

Layout (img2dataset/webdataset): ``<out>/train/{00000..000NN}.tar`` and ``<out>/val/{00000..000NN}.tar``, each
member triple ``KEY.jpg`` (32x32 RGB JPEG, quality 95, 4:4:4), ``KEY.txt`` (caption, utf-8) and ``KEY.json``
(``key``, ``index`` = dense per-split dataset index 0..n-1, ``split``, ``source_index`` into load_digits,
``caption``, ``width``/``height``, one field per attribute with its class name, and ``labels``: attribute ->
class id into ``classnames.json``, used for zero-shot evaluation). Keys are ``train_0000123`` / ``val_0000123``
(unique across splits, non-numeric, so the pipeline takes ``index`` from the json).

Next to the shards: ``classnames.json`` (attribute -> class names), ``templates.json`` (attribute -> zero-shot
prompt templates with one ``{}``), ``tokenizer/`` (a HF tokenizer trained on the train captions, see
``tokenizer.py``) and ``dataset.json`` (the manifest, written last and atomically: a directory without a
matching manifest is treated as half built and rebuilt).

Train and val use disjoint source images: the 1797 digits are split by a permutation fixed by ``seed``
(20 % of them, 359 images, go to val). Everything is deterministic: building twice with the same parameters
gives byte-identical files (fixed tar mtime/uid/gid/names, fixed JPEG settings, seeded numpy RNG). A build of
the default 8000 + 2000 samples takes a few seconds on one CPU core.

CLI: ``python -m neuclip_ds.data.embedded --out data/digits [--seed 0 --n-train 8000 --n-val 2000 --force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_path, atomic_write

DATASET_NAME = "neuclip-digits"
# Bump whenever the rendered bytes, captions, layout or tokenizer change; a different version triggers a rebuild.
DATASET_VERSION = "2.0"

CANVAS = 32
JPEG_QUALITY = 95
VAL_SOURCE_FRACTION = 0.2
DEFAULT_SAMPLES_PER_SHARD = 1000

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = {  # bright strokes ...
    "red": (235, 45, 45),
    "green": (50, 205, 70),
    "blue": (80, 140, 255),
    "yellow": (245, 220, 40),
    "purple": (200, 90, 235),
    "orange": (255, 150, 30),
}
BACKGROUNDS = {  # ... on dark backgrounds: one contrast polarity (module docstring)
    "black": (0, 0, 0),
    "grey": (64, 64, 64),
    "brown": (72, 44, 22),
    "navy": (16, 22, 78),
}
SCALES = {"small": 18, "large": 26}

ATTRIBUTES = ["digit", "colour", "background", "scale"]
CLASSNAMES: dict[str, list[str]] = {
    "digit": DIGIT_NAMES,
    "colour": list(COLOURS),
    "background": list(BACKGROUNDS),
    "scale": list(SCALES),
}
# Zero-shot prompt templates per attribute; "{}" is replaced by a class name of that attribute.
TEMPLATES: dict[str, list[str]] = {
    "digit": ["a photo of the digit {}", "a {} digit", "the number {}", "a handwritten {}"],
    "colour": ["a {} digit", "a digit drawn in {}", "a photo of a {} number"],
    "background": ["a digit on a {} background", "a number on a {} background", "a {} background"],
    "scale": ["a {} digit", "a photo of a {} number"],
}
# Caption templates; every one states every attribute. {a_scale} carries the article ("a"/"an").
CAPTION_TEMPLATES = [
    "{a_scale} {colour} {digit} on a {background} background",
    "the digit {digit} drawn {scale} in {colour} on a {background} background",
    "{a_background} background with {a_scale} {colour} {digit}",
    "{a_colour} {digit} {scale} on a {background} background",
]

_JITTER = 1


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def make_caption(attrs: dict[str, str], template_id: int) -> str:
    fields = dict(attrs)
    fields.update(
        a_scale=_article(attrs["scale"]), a_background=_article(attrs["background"]), a_colour=_article(attrs["colour"])
    )
    return CAPTION_TEMPLATES[template_id].format(**fields)


def split_sources(seed: int = 0, n_images: int = 1797) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, val) source-image indices into load_digits, from a permutation fixed by ``seed``."""
    perm = np.random.default_rng([seed, 7919]).permutation(n_images)
    n_val = round(n_images * VAL_SOURCE_FRACTION)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def render(digit_img: np.ndarray, attrs: dict[str, str], jitter: tuple[int, int]) -> Image.Image:
    """Render one 8x8 digit (values 0..16), centred and shifted by `jitter`, onto a CANVAS x CANVAS RGB image."""
    size = SCALES[attrs["scale"]]
    mask = Image.fromarray(np.clip(digit_img * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    mask = mask.resize((size, size), Image.Resampling.BICUBIC)
    x = int(np.clip((CANVAS - size) // 2 + jitter[0], 0, CANVAS - size))
    y = int(np.clip((CANVAS - size) // 2 + jitter[1], 0, CANVAS - size))
    alpha = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    alpha[y : y + size, x : x + size] = np.asarray(mask, dtype=np.float32) / 255.0
    bg = np.asarray(BACKGROUNDS[attrs["background"]], dtype=np.float32)
    fg = np.asarray(COLOURS[attrs["colour"]], dtype=np.float32)
    rgb = bg[None, None, :] * (1.0 - alpha[..., None]) + fg[None, None, :] * alpha[..., None]
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB")


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False, progressive=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def generate_split(
    split: str, n: int, sources: np.ndarray, images: np.ndarray, targets: np.ndarray, seed: int
) -> Iterator[tuple[str, bytes, str, dict]]:
    """Yield (key, jpg bytes, caption, json dict) for ``n`` samples of ``split`` drawn from ``sources``."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, 104729])
    # Cycle through shuffled sources so every source image is used about equally often.
    reps = -(-n // len(sources))
    order = np.concatenate([rng.permutation(sources) for _ in range(reps)])[:n]
    for index in range(n):
        src = int(order[index])
        choice = {name: int(rng.integers(len(CLASSNAMES[name]))) for name in ATTRIBUTES[1:]}
        jitter = (int(rng.integers(-_JITTER, _JITTER + 1)), int(rng.integers(-_JITTER, _JITTER + 1)))
        template_id = int(rng.integers(len(CAPTION_TEMPLATES)))
        labels = {"digit": int(targets[src]), **choice}
        attrs = {name: CLASSNAMES[name][labels[name]] for name in ATTRIBUTES}
        caption = make_caption(attrs, template_id)
        key = f"{split}_{index:07d}"
        meta = {
            "key": key,
            "index": index,
            "split": split,
            "source_index": src,
            "caption": caption,
            "width": CANVAS,
            "height": CANVAS,
            "template": template_id,
            "labels": labels,
            **attrs,
        }
        yield key, _jpeg_bytes(render(images[src], attrs, jitter)), caption, meta


def _write_shards(out_dir: Path, split: str, samples, n: int, per_shard: int) -> list[dict]:
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    n_shards = max(1, -(-n // per_shard))
    it = iter(samples)
    for s in range(n_shards):
        path = split_dir / f"{s:05d}.tar"
        count = 0
        with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for _ in range(min(per_shard, n - s * per_shard)):
                key, jpg, caption, meta = next(it)
                _add_member(tar, f"{key}.jpg", jpg)
                _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                count += 1
        shards.append(
            {
                "path": f"{split}/{path.name}",
                "num_samples": count,
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
            }
        )
    return shards


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _params(seed: int, n_train: int, n_val: int, samples_per_shard: int) -> dict:
    return {
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "samples_per_shard": samples_per_shard,
        "canvas": CANVAS,
        "jpeg_quality": JPEG_QUALITY,
    }


def load_manifest(out_dir: str | os.PathLike) -> dict | None:
    path = Path(out_dir) / "dataset.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(out_dir: str | os.PathLike, params: dict | None = None, *, verify_hashes: bool = True) -> bool:
    """True when ``out_dir`` holds a finished build of this DATASET_VERSION (and of ``params`` if given)."""
    out = Path(out_dir)
    m = load_manifest(out)
    if not m or m.get("name") != DATASET_NAME or m.get("version") != DATASET_VERSION:
        return False
    if params is not None and m.get("params") != params:
        return False
    for split in m.get("splits", {}).values():
        for shard in split.get("shard_files", []):
            p = out / shard["path"]
            if not p.is_file() or p.stat().st_size != shard["bytes"]:
                return False
            if verify_hashes and _sha256(p) != shard["sha256"]:
                return False
    return all((out / rel).is_file() for rel in ("classnames.json", "templates.json", "tokenizer/tokenizer.json"))


def build_embedded_dataset(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 8000,
    n_val: int = 2000,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    force: bool = False,
    verbose: bool = False,
) -> dict:
    """Build (or reuse) the embedded digits data set in ``out_dir``; return its manifest (``dataset.json``).

    The manifest has ``splits[split]`` with ``num_samples``, ``num_shards``, ``shards`` (a brace pattern relative
    to ``out_dir``), ``shard_files`` (path, num_samples, bytes, sha256); ``tokenizer``, ``classnames`` and
    ``templates`` (paths relative to ``out_dir``), ``params`` and ``version``; plus ``root`` (absolute
    ``out_dir``, not stored on disk). An existing complete build with the same version and params is reused
    (``manifest["reused"] = True``) unless ``force``. A rebuild deletes ``out_dir/{train,val,tokenizer}`` and
    the manifest first (nothing else in ``out_dir`` is touched).
    """
    if n_train < 1 or n_val < 1 or samples_per_shard < 1:
        raise ValueError("build_embedded_dataset: n_train, n_val and samples_per_shard must be >= 1")
    out = Path(out_dir)
    params = _params(seed, n_train, n_val, samples_per_shard)
    if not force and is_complete(out, params):
        manifest = load_manifest(out)
        manifest.update(root=str(out.resolve()), reused=True)
        return manifest

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # Invalidate first: a crash from here on leaves a directory without a manifest, i.e. "incomplete".
    (out / "dataset.json").unlink(missing_ok=True)
    for sub in ("train", "val", "tokenizer"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)

    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    train_src, val_src = split_sources(seed, len(images))
    if set(train_src.tolist()) & set(val_src.tolist()):  # pragma: no cover - guarded by construction
        raise AssertionError("embedded: train and val source images overlap")

    splits = {}
    captions_train: list[str] = []
    for split, n, src in (("train", n_train, train_src), ("val", n_val, val_src)):

        def samples(split=split, n=n, src=src):
            for key, jpg, caption, meta in generate_split(split, n, src, images, targets, seed):
                if split == "train":
                    captions_train.append(caption)
                yield key, jpg, caption, meta

        files = _write_shards(out, split, samples(), n, samples_per_shard)
        last = len(files) - 1
        splits[split] = {
            "num_samples": n,
            "num_shards": len(files),
            "shards": f"{split}/{{00000..{last:05d}}}.tar" if last else f"{split}/00000.tar",
            "shard_files": files,
            "num_source_images": len(src),
            "source_images_sha256": hashlib.sha256(np.asarray(src, dtype=np.int64).tobytes()).hexdigest(),
        }

    _write_json(out / "classnames.json", CLASSNAMES)
    _write_json(out / "templates.json", TEMPLATES)

    from .tokenizer import train_caption_tokenizer

    prompts = [t.format(c) for attr, ts in TEMPLATES.items() for t in ts for c in CLASSNAMES[attr]]
    train_caption_tokenizer(captions_train + prompts, out / "tokenizer")

    manifest = {
        "name": DATASET_NAME,
        "version": DATASET_VERSION,
        "params": params,
        "image_size": CANVAS,
        "attributes": ATTRIBUTES,
        "splits": splits,
        "classnames": "classnames.json",
        "templates": "templates.json",
        "tokenizer": "tokenizer",
        "source": "sklearn.datasets.load_digits",
    }
    _write_json(out / "dataset.json", manifest)  # last, atomically
    manifest = dict(manifest, root=str(out.resolve()), reused=False, build_seconds=round(time.perf_counter() - t0, 3))
    if verbose:
        print(describe(manifest))
    return manifest


def dataset_paths(out_dir: str | os.PathLike) -> dict:
    """Absolute paths of a built data set: train/val shard patterns, tokenizer dir, classnames/templates files.

    FileNotFoundError without a dataset.json; ValueError (one line) when it is not this version's manifest or names
    a path outside the directory: the run would otherwise fail later with a KeyError, or read files it was not
    pointed at."""
    out = Path(out_dir).resolve()
    m = load_manifest(out)
    if m is None:
        raise FileNotFoundError(
            f"embedded: no dataset.json in {str(out)!r}; build it with "
            f"`python -m neuclip_ds.data.embedded --out {out_dir}`"
        )
    rebuild = f"rebuild it with `python -m neuclip_ds.data.embedded --out {out_dir} --force`"
    if not isinstance(m, dict) or m.get("name") != DATASET_NAME or m.get("version") != DATASET_VERSION:
        found = f"{m.get('name')!r} v{m.get('version')}" if isinstance(m, dict) else "not a JSON object"
        raise ValueError(
            f"{out / 'dataset.json'} is not a {DATASET_NAME} v{DATASET_VERSION} manifest ({found}); {rebuild}"
        )

    def inside(value: object, key: str) -> str:
        """A relative path that stays inside the data set directory, made absolute."""
        if not isinstance(value, str) or not value:
            raise ValueError(f"{out / 'dataset.json'}: {key} must be a relative path, got {value!r}; {rebuild}")
        path = Path(os.path.normpath(out / value))  # by name: a symlink inside to shards elsewhere is the user's own
        if Path(value).is_absolute() or not path.is_relative_to(out):
            raise ValueError(f"{out / 'dataset.json'}: {key} {value!r} leads outside {out}")
        return str(path)

    def split(name: str) -> tuple[str, int]:
        entry = m.get("splits", {}).get(name) if isinstance(m.get("splits"), dict) else None
        count = entry.get("num_samples") if isinstance(entry, dict) else None
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{out / 'dataset.json'}: splits.{name} needs shards and num_samples >= 1; {rebuild}")
        return inside(entry.get("shards"), f"splits.{name}.shards"), count

    (train, num_train), (val, num_val) = split("train"), split("val")
    return {
        "train": train,
        "val": val,
        "tokenizer": inside(m.get("tokenizer"), "tokenizer"),
        "classnames": inside(m.get("classnames"), "classnames"),
        "templates": inside(m.get("templates"), "templates"),
        "num_train": num_train,
        "num_val": num_val,
    }


def load_classnames(out_dir: str | os.PathLike) -> dict[str, list[str]]:
    return json.loads((Path(out_dir) / "classnames.json").read_text(encoding="utf-8"))


def load_templates(out_dir: str | os.PathLike) -> dict[str, list[str]]:
    return json.loads((Path(out_dir) / "templates.json").read_text(encoding="utf-8"))


def describe(manifest: dict) -> str:
    root = manifest.get("root", ".")
    lines = [
        f"{manifest['name']} v{manifest['version']} in {root} "
        f"({'reused existing build' if manifest.get('reused') else 'built'}"
        + (f" in {manifest['build_seconds']:.1f}s" if "build_seconds" in manifest else "")
        + ")"
    ]
    for split, s in manifest["splits"].items():
        size = sum(f["bytes"] for f in s["shard_files"])
        lines.append(
            f"  {split}: {s['num_samples']} samples in {s['num_shards']} shards "
            f"({size / 1e6:.1f} MB) -> {os.path.join(root, s['shards'])}"
        )
    lines.append(f"  tokenizer: {os.path.join(root, manifest['tokenizer'])}")
    lines.append(
        f"  classnames: {os.path.join(root, manifest['classnames'])}, "
        f"templates: {os.path.join(root, manifest['templates'])}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neuclip_ds.data.embedded", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/digits", help="output directory (default: data/digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    a = p.parse_args(argv)
    manifest = build_embedded_dataset(
        a.out, seed=a.seed, n_train=a.n_train, n_val=a.n_val, samples_per_shard=a.samples_per_shard, force=a.force
    )
    print(describe(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
