"""A run never writes over another run, and a checkpoint is COMPLETE (and `latest`) only when every rank's files
are on disk. CPU, fp32, gloo; tiny preset, few steps."""

import os
import re

import pytest
import torch
from _launch import ROOT

from neuclip_ds import checkpoint
from neuclip_ds.launch import launch, launch_ranks, metrics

BASE = (
    "--synthetic-samples 64 --global-batch-size 16 --npn-prototypes 32 --npn-inner-steps 2 --warmup 1"
    " --save-every 2 --keep-last 10 --ds-config ds_configs/zero2.json"
).split()


def snapshot(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_mtime_ns) for p in directory.rglob("*"))


def error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("neuclip-train:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def the_one_error_line(ranks, besides=()) -> str:
    """The cause is printed once over all ranks, as one line, without a traceback (`besides`: the run's other
    messages)."""
    lines = [ln for r in ranks for ln in r.stderr.splitlines() if "neuclip-train:" in ln and ln not in besides]
    assert len(lines) == 1, [r.stderr[-3000:] for r in ranks]
    assert not any("Traceback" in r.stderr for r in ranks), [r.stderr[-3000:] for r in ranks]
    return lines[0]


def test_used_output_dir_is_refused_and_overwrite_removes_only_the_runs_files(tmp_path):
    out = tmp_path / "run"
    launch([*BASE, "--steps", "4", "--output-dir", str(out)])
    (out / "notes.txt").write_text("the user's")
    (out / "plots" / "by_hand.png").write_bytes(b"the user's")
    before = snapshot(out)

    again = launch([*BASE, "--steps", "2", "--output-dir", str(out)], check=False)
    assert again.returncode == 2
    assert error_line(again) == (
        f"neuclip-train: error: --output-dir: {out} already holds a run (config.yaml, metrics.jsonl, summary.json, "
        f"plots/training.png, checkpoints/); --resume auto to continue it, or --overwrite to start over (removes "
        f"only those files)"
    )
    both = launch([*BASE, "--steps", "2", "--output-dir", str(out), "--overwrite", "--resume", "auto"], check=False)
    assert both.returncode == 2 and "--overwrite: it would remove the checkpoint" in error_line(both)
    assert snapshot(out) == before  # refused: nothing touched

    launch([*BASE, "--steps", "2", "--output-dir", str(out), "--overwrite"])
    assert (out / "notes.txt").read_text() == "the user's" and (out / "plots" / "by_hand.png").is_file()
    assert [r["step"] for r in metrics(out)] == [1, 2]  # the new run's lines only
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"


class FakeEngine:
    """What checkpoint.save uses of a DeepSpeed engine: save_checkpoint, writing through checkpoint_engine.save.
    `lose`: a file name the disk silently loses (the write returns, nothing is there)."""

    def __init__(self, lose=None):
        self.checkpoint_engine = self
        self.lose = lose

    def save_checkpoint(self, save_dir, tag, save_latest):
        self.checkpoint_engine.save({"w": torch.zeros(1)}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))

    def save(self, state_dict, path):
        if os.path.basename(path) != self.lose:
            torch.save(state_dict, path)


def save(out, step, run_id, *, keep_last=2, engine=None):
    return checkpoint.save(
        engine or FakeEngine(), out, step=step, run_id=run_id, state={"shared": {}, "rank": {}}, keep_last=keep_last
    )


def test_rotation_deletes_only_the_current_runs_checkpoints(tmp_path):
    """An older run's tags sort after the new run's; rotation by name would delete the new run's checkpoints."""
    ckpts = tmp_path / "checkpoints"
    for step in (100, 200):
        save(tmp_path, step, "older")
    legacy = ckpts / "step00000300"  # a checkpoint from before run ids
    legacy.mkdir()
    (legacy / checkpoint.COMPLETE).write_text("300\n")
    for step in (2, 4, 6):
        save(tmp_path, step, "new")
    assert sorted(p.name for p in ckpts.glob("step*")) == [
        "step00000004",
        "step00000006",
        "step00000100",
        "step00000200",
        "step00000300",
    ]
    latest = (ckpts / "latest").read_text().strip()
    assert latest == "step00000006" and (ckpts / latest / checkpoint.COMPLETE).is_file()


def test_save_with_a_file_missing_on_disk_is_not_complete(tmp_path):
    """Every rank reported success, but a file is not there: no COMPLETE, `latest` unchanged, one line naming it."""
    ckpts = tmp_path / "checkpoints"
    save(tmp_path, 2, "run")
    with pytest.raises(checkpoint.CheckpointNotSaved) as e:
        save(tmp_path, 4, "run", engine=FakeEngine(lose="mp_rank_00_model_states.pt"))
    assert str(e.value) == (
        "checkpoint step00000004 not saved (mp_rank_00_model_states.pt is not on disk); "
        "`latest` still names step00000002"
    )
    assert not (ckpts / "step00000004" / checkpoint.COMPLETE).exists()
    assert (ckpts / "latest").read_text().strip() == "step00000002"


def test_latest_never_names_a_tag_being_rewritten(tmp_path):
    """Resumed from an earlier tag, the run saves over a later tag of its own that `latest` names: while that
    tag is rewritten (here: the rewrite fails), `latest` names the newest complete checkpoint before it."""
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4):
        save(tmp_path, step, "run", keep_last=10)
    with pytest.raises(checkpoint.CheckpointNotSaved):
        save(tmp_path, 4, "run", engine=FakeEngine(lose="mp_rank_00_model_states.pt"))
    assert (ckpts / "latest").read_text().strip() == "step00000002"
    assert (ckpts / "step00000002" / checkpoint.COMPLETE).is_file()


@pytest.mark.parametrize("failing_file", ["neuclip_rank", "optim_states", "engine"])
def test_a_save_that_fails_on_one_rank_stops_every_rank_and_keeps_latest(tmp_path, failing_file, monkeypatch):
    """Rank 1 cannot write a file of the step-4 save (ours, or DeepSpeed's optimizer shard), or DeepSpeed's
    save_checkpoint raises on rank 1 outside any write: no COMPLETE, `latest` still names step 2, and both ranks
    stop (exit 1) with the cause printed once, instead of hanging or moving `latest`."""
    out = tmp_path / "run"
    for name, value in (("FAIL_SAVE_STEP", "4"), ("FAIL_SAVE_RANK", "1"), ("FAIL_SAVE_FILE", failing_file)):
        monkeypatch.setenv(name, value)  # the launched ranks inherit them
    ranks = launch_ranks(
        [*BASE, "--steps", "6", "--output-dir", str(out)],
        nproc=2,
        script=str(ROOT / "tests" / "scripts" / "fail_save.py"),
        timeout=240,
    )
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000002"
    assert (ckpts / "step00000002" / checkpoint.COMPLETE).is_file()
    assert not (ckpts / "step00000004" / checkpoint.COMPLETE).exists()
    assert [r.returncode for r in ranks] == [1, 1], [r.stderr[-2000:] for r in ranks]
    line = the_one_error_line(ranks)
    assert line.startswith("neuclip-train: aborted: checkpoint step00000004 not saved (rank 1: "), line
    assert failing_file in line and "No space left on device (injected)" in line, line
    assert line.endswith("`latest` still names step00000002"), line
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # stopped at the failed save


def test_an_error_on_one_rank_ends_every_rank_promptly_with_one_line(small_digits, tmp_path):
    """One of two shards is unreadable, so one rank's first step finds no batch and raises while the other rank
    waits for it in a collective. Both ranks leave within seconds of each other (not at the collective timeout),
    exit 1, and the cause is printed once. Ranks are started without a launcher: none kills the survivor."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "00000.tar").write_bytes((small_digits / "train" / "00000.tar").read_bytes())
    (data / "00001.tar").write_bytes(b"not a tar file" * 100)
    shards, tokenizer = f"{data}/{{00000..00001}}.tar", str(small_digits / "tokenizer")
    args = [*BASE, "--steps", "4", "--train-data", shards, "--train-num-samples", "64", "--tokenizer", tokenizer]
    ranks = launch_ranks([*args, "--output-dir", str(tmp_path / "run")], nproc=2, timeout=240)
    assert [r.returncode for r in ranks] == [1, 1], [r.stderr[-2000:] for r in ranks]
    line = the_one_error_line(ranks)
    assert re.fullmatch(
        r"neuclip-train: error on rank [01]: RuntimeError: data: a whole epoch produced no batch.*", line
    ), line
    gap = abs(ranks[0].exited_after_s - ranks[1].exited_after_s)
    assert gap < 30, f"the ranks left {gap:.0f} s apart"


def test_a_rank_file_missing_on_resume_ends_every_rank_and_debug_shows_the_traceback(tmp_path):
    """Resume where rank 1's own file of the checkpoint is gone: rank 1 fails while loading, rank 0 goes on into
    the first step's collectives. Both leave promptly; --debug prints the traceback of the failure."""
    out = tmp_path / "run"
    launch([*BASE, "--steps", "2", "--output-dir", str(out)], nproc=2)
    (out / "checkpoints" / "step00000002" / "neuclip_rank1.pt").unlink()
    ranks = launch_ranks(
        [*BASE, "--steps", "4", "--output-dir", str(out), "--resume", "auto", "--debug"], nproc=2, timeout=240
    )
    assert [r.returncode for r in ranks] == [1, 1], [r.stderr[-2000:] for r in ranks]
    assert re.search(r"^neuclip-train: aborted: .*neuclip_rank1.pt is missing$", ranks[1].stderr, re.M), ranks[1].stderr
    assert "Traceback (most recent call last)" in ranks[1].stderr
    assert abs(ranks[0].exited_after_s - ranks[1].exited_after_s) < 30


def test_non_finite_weights_on_one_rank_are_never_saved(tmp_path, monkeypatch):
    """Rank 1's weights turn infinite right before the step-2 save: both ranks refuse that save alike, the
    following steps are skipped, and the abort says no checkpoint precedes the first skipped step."""
    out = tmp_path / "run"
    monkeypatch.setenv("POISON_STEP", "1")  # the launched ranks inherit both
    monkeypatch.setenv("POISON_RANK", "1")
    ranks = launch_ranks(
        [*BASE, "--steps", "8", "--output-dir", str(out), "--max-skipped-in-a-row", "3"],
        nproc=2,
        script=str(ROOT / "tests" / "scripts" / "poison_weights.py"),
        timeout=240,
    )
    assert [r.returncode for r in ranks] == [1, 1], [r.stderr[-2000:] for r in ranks]
    refusal = "neuclip-train: step 2 not saved: the weights or optimizer state hold non-finite values"
    then_skipped = "neuclip-train: step 4 not saved: the last step was skipped"
    assert refusal in ranks[0].stderr.splitlines() and then_skipped in ranks[0].stderr.splitlines()
    assert not list((out / "checkpoints").glob("step*"))
    assert the_one_error_line(ranks, besides=[refusal, then_skipped]) == (
        "neuclip-train: aborted: 3 steps in a row skipped (non-finite features); no "
        "checkpoint was saved before the first skipped step: start over with a lower "
        "--lr, or check the data"
    )
