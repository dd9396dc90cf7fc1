"""Checkpoints (issue: bit-exact resume, crash safety, another world size, bad input). CPU, fp32, gloo."""

import os
import random

import pytest

from _launch import ROOT, kill_after_step, launch, launch_script, metrics, summary

STEPS = 8
BASE = ["--synthetic-samples", "160", "--steps", str(STEPS), "--global-batch-size", "16", "--npn-prototypes", "32",
        "--npn-inner-steps", "3", "--npn-restart-every", "3", "--lr", "1e-3", "--warmup", "1", "--save-every", "2",
        "--keep-last", "10", "--ds-config", "ds_configs/zero2.json"]
KEYS = ("loss", "tau", "lr")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, cached by (loss, nproc)."""
    root = tmp_path_factory.mktemp("ckpt_ref")
    cache = {}

    def get(loss="neuclip", nproc=2):
        key = (loss, nproc)
        if key not in cache:
            out = root / f"{loss}_{nproc}"
            launch([*BASE, "--loss", loss, "--output-dir", str(out)], nproc=nproc)
            cache[key] = metrics(out)
        return cache[key]
    return get


def assert_identical(got, ref, rel=0.0):
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(got, ref):
        for k in KEYS:
            if rel == 0.0:
                assert a[k] == b[k], (k, a["step"], a[k], b[k])
            else:
                assert a[k] == pytest.approx(b[k], rel=rel), (k, a["step"], a[k], b[k])


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    from neuclip_ds.data.embedded import build_embedded_dataset

    root = tmp_path_factory.mktemp("ckpt_digits")
    build_embedded_dataset(root, seed=0, n_train=256, n_val=32, samples_per_shard=32)
    return root


@pytest.mark.parametrize("loss,data", [("neuclip", "synthetic"), ("fastclip", "webdataset")])
def test_sigkill_then_resume_is_bit_exact(reference, tmp_path, small_set, loss, data):
    """Kill every process of a 2-rank run at a random step, resume, compare metrics.jsonl step by step. The
    webdataset case also restores the loader position (shard order, shuffle buffer, crops) and the u tables."""
    kill_step = random.Random().randint(3, STEPS - 1)
    out = tmp_path / "run"
    extra = [] if data == "synthetic" else ["--train-data", f"{small_set}/train/{{00000..00007}}.tar",
                                            "--train-num-samples", "256", "--dataset-size", "256",
                                            "--tokenizer", str(small_set / "tokenizer")]
    args = [*BASE, "--loss", loss, *extra, "--output-dir", str(out)]
    kill_after_step(args, 2, out, kill_step)
    assert (out / "checkpoints" / "latest").is_file(), f"killed at step {kill_step} before any checkpoint"
    launch([*args, "--resume", "auto"], nproc=2)
    ref_out = tmp_path / "ref"
    if data == "synthetic":
        ref = reference(loss, 2)
    else:
        launch([*BASE, "--loss", loss, *extra, "--output-dir", str(ref_out)], nproc=2)
        ref = metrics(ref_out)
    assert_identical(metrics(out), ref), f"kill step {kill_step}"


def test_kill_during_save_keeps_the_previous_checkpoint(reference, tmp_path):
    out = tmp_path / "run"
    args = [*BASE, "--output-dir", str(out)]
    os.environ["KILL_SAVE_STEP"] = "4"
    try:
        proc = launch_script(str(ROOT / "tests" / "scripts" / "kill_during_save.py"), args, nproc=2, check=False)
    finally:
        del os.environ["KILL_SAVE_STEP"]
    assert proc.returncode != 0
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000002"   # `latest` did not move
    assert (ckpts / "step00000004").is_dir() and not (ckpts / "step00000004" / "COMPLETE").exists()
    # asking for the half-written one explicitly: one clear line, exit 2, nothing touched
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    bad = launch([*args, "--resume", str(ckpts / "step00000004")], nproc=1, check=False)
    assert bad.returncode == 2 and "not a complete checkpoint" in bad.stderr.strip().splitlines()[-1]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    # auto resumes from step 2 and reproduces the uninterrupted run
    launch([*args, "--resume", "auto"], nproc=2)
    assert_identical(metrics(out), reference("neuclip", 2))


@pytest.mark.parametrize("loss,old,new", [("neuclip", 2, 1), ("fastclip", 1, 2)])
def test_resume_at_another_world_size(reference, tmp_path, loss, old, new):
    """Universal checkpoint: weights, tau, optimizer, schedule and the NPN carry over exactly; u tables are
    re-sharded; synthetic data continues exactly, so the curve matches up to world-size rounding."""
    out = tmp_path / "run"
    args = [*BASE, "--loss", loss, "--output-dir", str(out)]
    kill_after_step(args, old, out, 5)
    tag = (out / "checkpoints" / "latest").read_text().strip()
    proc = launch([*args, "--resume", "auto"], nproc=new)
    assert "universal checkpoint" in proc.stderr
    assert_identical(metrics(out), reference(loss, old), rel=1e-5)
    assert (out / "checkpoints" / f"{tag}_universal").is_dir()
    if loss == "neuclip":
        assert len(set(summary(out)["npn_checksums"])) == 1


def test_resume_bad_inputs_are_one_line_and_touch_nothing(tmp_path):
    out = tmp_path / "run"
    args = [*BASE, "--steps", "2", "--output-dir", str(out)]
    launch(args, nproc=1)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    cases = [(["--resume", str(tmp_path / "nowhere")], "does not exist"),
             (["--resume", "auto", "--preset", "ViT-B-32"], "--preset 'tiny', this run has 'ViT-B-32'"),
             (["--resume", "auto", "--loss", "mbcl"], "--loss 'neuclip', this run has 'mbcl'"),
             (["--resume", "auto", "--ds-config", "ds_configs/zero3.json"], "ZeRO stage 2, this run uses stage 3")]
    for extra, needle in cases:
        proc = launch([*args, *extra], nproc=1, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and needle in lines[-1] and lines[-1].startswith("neuclip-train: error:"), \
            (extra, proc.stderr[-500:])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
