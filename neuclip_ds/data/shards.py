"""Shard specs -> shard lists. The one expansion that both run validation (config.py) and the loaders
(loader.py) use, so a spec is read at run time exactly as it was checked before the run started.

A spec is a string of ``::``-joined parts, each brace-expanded (``a/{00000..00007}.tar::b/x.tar``, webdataset's
``expand_urls``, which also substitutes ``WDS_`` environment variables), or a list of such strings. A local name
with glob characters (``shards/*.tar``) that is not itself a file is replaced by its sorted matches. URLs
(``s3://...``, ``pipe:...``) are taken as they are; they cannot be checked without opening them.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence


def is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url)) or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _names(shards: str | os.PathLike | Sequence[str]) -> list[str]:
    """Split on ``::`` and brace-expand; blank names dropped, surrounding spaces (``a.tar :: b.tar``) removed."""
    from webdataset.shardlists import expand_urls

    specs = [shards] if isinstance(shards, (str, os.PathLike)) else shards
    return [name.strip() for spec in specs for name in expand_urls(os.fspath(spec)) if name.strip()]


def _globbed(url: str) -> list[str]:
    """A local glob pattern -> its sorted matches (the pattern itself when nothing matches: reported missing)."""
    path = local_path(url)
    if not is_local(url) or not glob.has_magic(path) or os.path.exists(path):
        return [url]
    prefix = url[: len(url) - len(path)]
    return [prefix + match for match in sorted(glob.glob(path))] or [url]


def _readable(url: str) -> bool:
    path = local_path(url)
    return os.path.isfile(path) and os.access(path, os.R_OK)


def expand_shards(shards: str | os.PathLike | Sequence[str]) -> tuple[list[str], list[str]]:
    """(usable urls, local names that are missing or unreadable), each in spec order.

    Raises ``FileNotFoundError`` (a one-line message naming the spec) when nothing usable remains."""
    urls = [u for name in _names(shards) for u in _globbed(name)]
    usable = [u for u in urls if not is_local(u) or _readable(u)]
    unusable = [u for u in urls if is_local(u) and not _readable(u)]
    if not usable:
        present = sum(os.path.exists(local_path(u)) for u in unusable)
        if present:
            raise FileNotFoundError(
                f"none of the {len(urls)} shard(s) of {shards!r} is a readable file "
                f"({present} of them exist but are not files or cannot be read)"
            )
        raise FileNotFoundError(f"no shard matches {shards!r} ({len(urls)} name(s) after expansion, none exists)")
    return usable, unusable
