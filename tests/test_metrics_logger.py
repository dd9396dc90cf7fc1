"""metrics.MetricsLogger and the readers of metrics.jsonl: torn lines, resume, reporters that fail to start."""

import json
import sys
import types
import warnings

import pytest

from neuclip_ds import metrics as M
from neuclip_ds.launch import last_step
from neuclip_ds.launch import metrics as launch_metrics


def _write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_torn_last_line_is_skipped_silently(tmp_path):
    _write(tmp_path / "metrics.jsonl", [{"step": 1}, {"step": 2}], tail='{"step": 3, "lo')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in M.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
        assert [r["step"] for r in launch_metrics(tmp_path)] == [1, 2]
        assert last_step(tmp_path) == 2
    assert last_step(tmp_path / "nothing_yet") == 0


def test_torn_line_inside_the_file_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n3\n{"step": 3}\n')
    with pytest.warns(UserWarning, match="skipped 2 line"):
        assert [r["step"] for r in M.read_metrics(path)] == [1, 2, 3]


@pytest.mark.parametrize("tail", ['{"step": 4, "lo', '{"step": 3, "loss": 1.0}\n{"st'])
def test_resume_truncates_a_file_with_a_torn_line(tmp_path, tail):
    """A run killed mid-write: --resume from step 2 keeps steps 1-2, drops the rest and the torn line, and the
    next record starts on a line of its own."""
    _write(tmp_path / "metrics.jsonl", [{"step": 1}, {"step": 2}, {"step": 3}], tail=tail)
    logger = M.MetricsLogger(tmp_path, rank=0, total_steps=5, initial_step=2, resume=True, log_every=100)
    try:
        logger.log({"step": 3, "loss": 2.0})
    finally:
        logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3, "loss": 2.0}\n'
    assert not list(tmp_path.glob("metrics.jsonl.tmp*"))


class _FakeWandbRun:
    def __init__(self, **kwargs):
        self.kwargs, self.finished = kwargs, False

    def log(self, numbers, step):
        pass

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A wandb module whose init records its arguments and returns a run that records finish()."""
    runs = []

    def init(**kwargs):
        runs.append(_FakeWandbRun(**kwargs))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return runs


@pytest.fixture
def opened(monkeypatch):
    """The files MetricsLogger opens."""
    files = []

    def recording_open(*args, **kwargs):
        files.append(open(*args, **kwargs))  # noqa: SIM115 (the test checks they were closed)
        return files[-1]

    monkeypatch.setattr(M, "open", recording_open, raising=False)
    return files


def test_a_reporter_failing_to_start_leaves_nothing_open(tmp_path, monkeypatch, fake_wandb, opened):
    def failing_writer(**kwargs):
        raise OSError("tensorboard: no space left")

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=failing_writer))
    with pytest.raises(OSError, match="no space left"):
        M.MetricsLogger(tmp_path, rank=0, total_steps=5, report_to="jsonl,wandb,tensorboard", log_every=1)
    assert [run.finished for run in fake_wandb] == [True]
    assert all(f.closed for f in opened)


def test_the_progress_bar_failing_to_start_closes_metrics_jsonl(tmp_path, monkeypatch, opened):
    def failing_bar(*args, **kwargs):
        raise RuntimeError("no terminal")

    monkeypatch.setattr(M, "tqdm", failing_bar)
    monkeypatch.setattr(M, "resolve_log_every", lambda log_every: None)  # the bar, as on a terminal
    with pytest.raises(RuntimeError, match="no terminal"):
        M.MetricsLogger(tmp_path, rank=0, total_steps=5, log_every=None)
    assert len(opened) == 1 and opened[0].closed


def test_wandb_run_id_is_the_run_id(tmp_path, fake_wandb):
    """A resumed run (the same run id, kept in its checkpoints) continues its wandb run."""
    for resume in (False, True):
        logger = M.MetricsLogger(tmp_path, rank=0, total_steps=5, report_to="wandb", resume=resume, run_id="abc123")
        logger.close()
    assert [run.kwargs["id"] for run in fake_wandb] == ["abc123", "abc123"]
    assert all(run.kwargs["resume"] == "allow" for run in fake_wandb)
