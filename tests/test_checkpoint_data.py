"""Checkpoints are data, not code (issue 13): a checkpoint file that would run code when unpickled is refused, with
one line naming it, before any of it runs, by --resume (same and another world size: the universal conversion and
its loading), neuclip-export and neuclip-eval; real ZeRO-1/2/3 checkpoints (fp32, bf16) still resume and export.
CPU, gloo.

A resume scans the files before loading (torch.save's zip format) so that every rank stops alike; a file in the
legacy format is not scanned and reaches the loaders, which refuse it themselves: the resume cases plant both."""

import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from neuclip_ds.launch import launch, metrics

TINY = ["--synthetic-samples", "64", "--global-batch-size", "16", "--npn-prototypes", "32", "--npn-inner-steps", "2"]
TAG = "step00000002"
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIMIZER_SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
UNIVERSAL_FRAGMENT = "zero/logit_scale/fp32.pt"


class CreatesAFile:
    """Unpickled, this calls open(path, "w"): the file appears if and only if a loader ran code from the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def train_args(out: Path, *, steps: int, ds_config: str = "zero2.json", extra=()) -> list[str]:
    return [*TINY, "--steps", str(steps), "--ds-config", f"ds_configs/{ds_config}", "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 1-rank ZeRO-2 run with its checkpoint at step 2; tests work on copies."""
    out = tmp_path_factory.mktemp("data_only") / "run"
    launch(train_args(out, steps=2))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from neuclip_ds.data.embedded import build_embedded_dataset

    root = tmp_path_factory.mktemp("data_only_digits")
    build_embedded_dataset(root, seed=0, n_train=32, n_val=16, samples_per_shard=16)
    return root


def copy_of(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def plant(path: Path, marker: Path, form: str = "zip") -> None:
    """Replace a checkpoint file by a pickle that creates `marker` when loaded without weights_only: torch.save's
    zip format, or a bare pickle (torch.load reads it as its legacy format)."""
    if form == "zip":
        torch.save(CreatesAFile(marker), path)
    else:
        path.write_bytes(pickle.dumps(CreatesAFile(marker), protocol=2))


def command(kind: str, run: Path, request) -> tuple[list[str], str]:
    """(arguments, module) of one of the three programs that read a checkpoint."""
    if kind == "resume":
        return train_args(run, steps=3, extra=["--resume", "auto"]), "neuclip_ds.train"
    if kind == "export":
        return ["--checkpoint", str(run), "--out", str(run.parent / "hf")], "neuclip_ds.export"
    return (
        ["--checkpoint", str(run), "--dataset-dir", str(request.getfixturevalue("dataset")), "--no-progress"],
        "neuclip_ds.evaluate",
    )


def refusal_lines(stderr: str, path: Path) -> list[str]:
    """The stderr lines that name `path`; each must be a refusal."""
    lines = [line for line in stderr.splitlines() if str(path) in line]
    assert lines and all("refused: it names io.open, which is not on the allow-list" in line for line in lines), stderr[
        -3000:
    ]
    return lines


PROGRAM = {"resume": "neuclip-train: aborted:", "export": "neuclip-export: error:", "eval": "neuclip-eval: error:"}


@pytest.mark.parametrize("victim", [MODEL_STATES, OPTIMIZER_SHARD])
@pytest.mark.parametrize("kind,form", [("resume", "zip"), ("resume", "legacy"), ("export", "zip"), ("eval", "zip")])
def test_a_file_that_would_run_code_is_refused_in_one_line(trained, tmp_path, request, kind, form, victim):
    run, marker = copy_of(trained, tmp_path), tmp_path / "MARKER"
    path = run / "checkpoints" / TAG / victim
    plant(path, marker, form)
    args, module = command(kind, run, request)
    proc = launch(args, module=module, check=False)
    assert proc.returncode != 0
    assert not marker.exists(), "the checkpoint ran code"
    lines = proc.stderr.strip().splitlines()
    assert refusal_lines(proc.stderr, path) == [lines[-1]] and lines[-1].startswith(PROGRAM[kind]), lines[-5:]


def test_the_untouched_checkpoint_resumes_exports_and_evaluates(trained, tmp_path, request):
    """The control of the test above: the same commands on the same checkpoint, not tampered with."""
    run = copy_of(trained, tmp_path)
    for kind in ("export", "eval", "resume"):
        args, module = command(kind, run, request)
        launch(args, module=module)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]


def test_another_world_size_refuses_a_file_in_the_conversion(trained, tmp_path):
    """1 -> 2 ranks: ds_to_universal reads the tag's files (in a subprocess of rank 0)."""
    run, marker = copy_of(trained, tmp_path), tmp_path / "MARKER"
    path = run / "checkpoints" / TAG / MODEL_STATES
    plant(path, marker)
    proc = launch(train_args(run, steps=3, extra=["--resume", "auto"]), nproc=2, check=False)
    assert proc.returncode != 0 and not marker.exists()
    # `in`, not startswith: the two ranks' lines share stderr, and print writes a line's end separately
    assert all("aborted: --resume: ds_to_universal failed on" in line for line in refusal_lines(proc.stderr, path))


def test_another_world_size_refuses_a_file_of_the_universal_checkpoint(trained, tmp_path):
    """1 -> 2 ranks from an existing universal conversion: found by the scan, so both ranks stop (the loader behind
    it: the next test)."""
    from neuclip_ds.checkpoint import to_universal

    run, marker = copy_of(trained, tmp_path), tmp_path / "MARKER"
    universal = to_universal(run / "checkpoints" / TAG)  # the conversion itself reads every file as data
    path = universal / UNIVERSAL_FRAGMENT
    plant(path, marker)
    proc = launch(train_args(run, steps=3, extra=["--resume", "auto"]), nproc=2, check=False)
    assert proc.returncode != 0 and not marker.exists()
    assert all("neuclip-train: aborted:" in line for line in refusal_lines(proc.stderr, path))


def test_what_deepspeed_reads_inside_the_block_is_data(tmp_path):
    """files_read_as_data routes the engine's checkpoint engine and DeepSpeed's own torch.load calls (universal
    loading, zero_to_fp32, ds_to_universal: weights_only=False) through load_data, and puts torch.load back."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from neuclip_ds.checkpoint import CheckpointError, files_read_as_data

    engine, marker, original = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine()), tmp_path / "M", torch.load
    for form in ("zip", "legacy"):
        path = tmp_path / f"{form}.pt"
        plant(path, marker, form)
        with files_read_as_data(engine):
            for load in (engine.checkpoint_engine.load, lambda p: torch.load(p, weights_only=False)):
                with pytest.raises(CheckpointError, match=f"{path} refused: it names io.open"):
                    load(path)
    assert torch.load is original and not marker.exists()


@pytest.mark.parametrize("ds_config,precision", [("zero1.json", "bf16"), ("zero3.json", "fp32")])
def test_real_checkpoints_of_every_stage_resume_and_export(tmp_path, ds_config, precision):
    """Every file DeepSpeed writes passes the allow-list (ZeRO-2 fp32: the control test above)."""
    out = tmp_path / "run"
    extra = ["--precision", precision]
    launch(train_args(out, steps=2, ds_config=ds_config, extra=extra))
    launch(train_args(out, steps=3, ds_config=ds_config, extra=[*extra, "--resume", "auto"]))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    launch(["--checkpoint", str(out), "--out", str(tmp_path / "hf")], module="neuclip_ds.export")
