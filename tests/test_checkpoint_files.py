"""What a resume trusts in a checkpoint's own files: neuclip_state.pt must be neuclip_ds's state (a foreign or old
file is one error line, exit 2, before anything starts), and `latest` must name a tag of the checkpoints directory,
never a path outside it."""

from pathlib import Path

import pytest
import torch

from neuclip_ds import checkpoint as C
from neuclip_ds.train import main

TAG = "step00000002"
ARGS = ["--synthetic-samples", "16", "--global-batch-size", "8", "--steps", "4", "--ds-config", "ds_configs/zero2.json"]


def fake_run(tmp_path: Path, shared: object, latest: str = TAG) -> Path:
    """A run directory whose `latest` names a complete tag holding `shared` as its neuclip_state.pt."""
    out = tmp_path / "run"
    tag_dir = out / "checkpoints" / TAG
    tag_dir.mkdir(parents=True)
    (tag_dir / C.COMPLETE).write_text("")
    torch.save(shared, tag_dir / C.SHARED_FILE)
    (out / "checkpoints" / "latest").write_text(latest)
    return out


def valid_shared() -> dict:
    return {"step": 2, "world_size": 1, "config": {}, "estimator": {}, "data_rank0": {}}


@pytest.mark.parametrize(
    "shared",
    [
        [1, 2, 3],
        {"config": {"preset": "tiny"}},
        {**valid_shared(), "world_size": "1"},
        {**valid_shared(), "step": -1},
        {**valid_shared(), "world_size": 0},
        {**valid_shared(), "config": None},
    ],
    ids=["list", "missing_keys", "world_size_str", "negative_step", "zero_world", "config_none"],
)
def test_foreign_state_file_is_one_line_exit_2(tmp_path, capsys, monkeypatch, shared):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    out = fake_run(tmp_path, shared)
    assert main([*ARGS, "--output-dir", str(out), "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("neuclip-train: error: --resume:"), err
    assert C.SHARED_FILE in err[0]


def test_valid_state_file_passes_the_schema(tmp_path):
    out = fake_run(tmp_path, valid_shared())
    assert C.read_shared(out / "checkpoints" / TAG)["step"] == 2


@pytest.mark.parametrize("name", ["../../etc", "/etc", "step00000002/../..", "", "step2"])
def test_latest_naming_something_else_than_a_tag_is_refused(tmp_path, capsys, monkeypatch, name):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    out = fake_run(tmp_path, valid_shared(), latest=name)
    with pytest.raises(C.CheckpointError, match="not a checkpoint tag"):
        C.resolve_resume("auto", out)
    with pytest.raises(C.CheckpointError, match="not a checkpoint tag"):
        C.resolve_resume(str(out), out)
    with pytest.raises(C.CheckpointError, match="not a checkpoint tag"):
        C.resolve_checkpoint(out)
    assert main([*ARGS, "--output-dir", str(out), "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a checkpoint tag" in err[0], err
