"""metrics.MetricsLogger and the readers of metrics.jsonl: torn lines, resume, reporters that fail to start."""

import json
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
