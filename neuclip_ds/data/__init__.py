"""Data for neuclip_ds: the embedded digits data set, the tokenizer wrapper and the webdataset loader.

    embedded     build_embedded_dataset(out_dir, ...) -> manifest; python -m neuclip_ds.data.embedded --out DIR
    tokenizer    TextTokenizer(path, context_length); train_caption_tokenizer(captions, out_dir);
                 trim_text_padding(ids, mask) (pad to the batch's longest caption)
    shards       expand_shards(spec) -> (usable urls, missing/unreadable local names), for validation and loaders
    transforms   ImageTransform (train crop / eval resize + CLIP normalization), CLIP_MEAN, CLIP_STD
    loader       make_train_loader / make_eval_loader -> ClipLoader (batches + data position)
    bad_samples  BAD_REASONS, BadSampleTracker, check_bad_fraction (the abort rule), BadSampleWarning
    stream       LoaderStream: a loader as per-optimizer-step micro-batches for the trainer
Names are re-exported lazily (PEP 562), so ``python -m neuclip_ds.data.embedded`` does not pre-import itself and
importing the package stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "bad_samples": [
        "BAD_REASONS",
        "BadSampleTracker",
        "BadSampleWarning",
        "TooManyBadSamplesError",
        "check_bad_fraction",
    ],
    "embedded": ["build_embedded_dataset", "dataset_paths", "load_classnames", "load_templates", "is_complete"],
    "loader": ["ClipLoader", "make_eval_loader", "make_train_loader"],
    "shards": ["expand_shards"],
    "stream": ["LoaderStream"],
    "tokenizer": ["TextTokenizer", "train_caption_tokenizer", "trim_text_padding"],
    "transforms": ["CLIP_MEAN", "CLIP_STD", "ImageTransform"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
