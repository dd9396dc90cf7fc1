"""A run never writes over another run. CPU, fp32, gloo; tiny preset, few steps."""

from _launch import launch, metrics

BASE = ["--synthetic-samples", "64", "--global-batch-size", "16", "--npn-prototypes", "32", "--npn-inner-steps", "2",
        "--warmup", "1", "--save-every", "2", "--keep-last", "10", "--ds-config", "ds_configs/zero2.json"]


def snapshot(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_mtime_ns) for p in directory.rglob("*"))


def error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("neuclip-train:")]
    assert len(lines) == 1, proc.stderr[-3000:]
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
        f"only those files)")
    both = launch([*BASE, "--steps", "2", "--output-dir", str(out), "--overwrite", "--resume", "auto"], check=False)
    assert both.returncode == 2 and "--overwrite: it would remove the checkpoint" in error_line(both)
    assert snapshot(out) == before    # refused: nothing touched

    launch([*BASE, "--steps", "2", "--output-dir", str(out), "--overwrite"])
    assert (out / "notes.txt").read_text() == "the user's" and (out / "plots" / "by_hand.png").is_file()
    assert [r["step"] for r in metrics(out)] == [1, 2]                       # the new run's lines only
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
