"""What a run writes into `--output-dir`, and the rule that protects it: a directory that holds a run is either
continued (`--resume`) or explicitly started over (`--overwrite`), never silently written over.

A directory "holds a run" when it has any of the files below; these are also all that `--overwrite` removes (a
user's other files in the directory, `plots/` included, stay where they are):
    config.yaml, metrics.jsonl, summary.json, eval_results.json  the run's records
    plots/training.png                                           the training plot
    checkpoints/                                                 wholly the trainer's (DeepSpeed adds its own
                                                                 files there: zero_to_fp32.py, ...)
    tensorboard/                                                 wholly the trainer's (--report-to tensorboard)
    profile/                                                     wholly the trainer's (--profile-steps)
A wandb/ directory is neither: each wandb run is a directory of its own there, which a new run does not touch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError


@dataclass(frozen=True)
class RunFiles:
    """Where a run's outputs live under its output directory: the one place that names them."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def eval_results(self) -> Path:
        return self.root / "eval_results.json"

    @property
    def plot(self) -> Path:
        return self.root / "plots" / "training.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def profile(self) -> Path:
        return self.root / "profile"

    def records(self) -> list[Path]:
        return [self.config, self.metrics, self.summary, self.eval_results, self.plot]


RUN_FILES = tuple(str(p) for p in RunFiles(Path()).records())
CHECKPOINTS = RunFiles(Path()).checkpoints.name
RUN_DIRS = (CHECKPOINTS, RunFiles(Path()).tensorboard.name, RunFiles(Path()).profile.name)


def previous_run(output_dir: str | Path) -> list[str]:
    """The run outputs in output_dir, as paths relative to it (a directory with a trailing /); [] if none."""
    out = Path(output_dir)
    found = [name for name in RUN_FILES if (out / name).is_file()]
    found += [name + "/" for name in RUN_DIRS if (out / name).is_dir() and any((out / name).iterdir())]
    return found


def _continues(resume: str | None, output_dir: str | Path) -> bool:
    """--resume continues the run of output_dir (auto, or a checkpoint inside it)."""
    return resume == "auto" or (
        resume is not None and Path(resume).resolve().is_relative_to(Path(output_dir).resolve())
    )


def check_writable(output_dir: str | Path) -> None:
    """Refuse (ConfigError, one line) an output_dir that cannot be created or written to, before anything starts.

    A directory is made and removed again in the deepest part of the path that exists: output_dir itself, or
    where its first missing part would be created (what can be made there, the run can make below it). A real
    attempt rather than os.access, which root passes on any permission bits; nothing stays behind."""
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise ConfigError(f"--output-dir: cannot create {output_dir}: {existing} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".neuclip-write-check-", dir=existing))
    except OSError as e:
        action = "write to" if existing == path else f"create {output_dir} in"
        raise ConfigError(f"--output-dir: cannot {action} {existing}: {e.strerror}") from None


def check_output_dir(output_dir: str | Path, *, resume: str | None, overwrite: bool) -> None:
    """Refuse (ConfigError, one line) to start a run that would write over another run in output_dir.

    Accepted: a directory without a run; --overwrite (unless it would remove the checkpoint --resume names);
    --resume auto or a --resume checkpoint inside output_dir (the same run, continued). A pure check: every rank
    runs it on the same files before the process group starts, so all ranks decide alike."""
    if overwrite and _continues(resume, output_dir):
        raise ConfigError(
            f"--overwrite: it would remove the checkpoint that --resume {resume} continues from; give one of the two"
        )
    found = previous_run(output_dir)
    if not found or overwrite or _continues(resume, output_dir):
        return
    what = f"{output_dir} already holds a run ({', '.join(found)})"
    if resume is None:
        raise ConfigError(
            f"--output-dir: {what}; --resume auto to continue it, or --overwrite to start over "
            f"(removes only those files)"
        )
    raise ConfigError(
        f"--resume: {resume} is not in --output-dir, and {what}; choose a new --output-dir, or "
        f"--overwrite to start over there (removes only those files)"
    )


def remove_previous_run(output_dir: str | Path) -> list[str]:
    """--overwrite: delete the run outputs found by `previous_run` (nothing else); returns what was removed."""
    out = Path(output_dir)
    removed = previous_run(out)
    for name in removed:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    plots = out / "plots"
    if "plots/training.png" in removed and not any(plots.iterdir()):  # ours when our plot was all it held
        plots.rmdir()
    return removed
