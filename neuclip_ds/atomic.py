"""Atomic file writes: whoever reads the file (a resumed run reading a checkpoint or `latest`, a data set's
manifest, evaluation results) sees the old content or the whole new one, never a part of it.

The new content goes to a temporary file beside the target, `NAME.tmpPID`: in the same directory, hence on the same
file system, so that `os.replace` moves it onto the target in one step; named after the process, so that processes
writing the same name (ranks, concurrent builds) never write into one temporary file.

Standard library only, so that light entry points (the data builder) can use it without importing the trainer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary path to write `path`'s new content to, by any means (a stream, a library's own save);
    leaving the block normally moves it onto `path`. On an error the temporary file is removed and `path` is left
    as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error that got us here is the one to report
            tmp.unlink(missing_ok=True)
        raise


def atomic_write(
    path: str | os.PathLike, data: str | bytes | Callable[[Path], object], *, encoding: str = "utf-8"
) -> Path:
    """Write `path` atomically (`atomic_path`): `data` as text (in `encoding`), as bytes, or, when it is callable,
    whatever `data(tmp)` writes to the temporary path it is given (e.g. `functools.partial(torch.save, obj)`).
    Returns `path` as a Path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding=encoding)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
    return path
