"""Checkpoints (issue: bit-exact resume, crash safety, another world size, bad input). CPU, fp32, gloo."""

import os
import signal
import sys

import pytest
from _launch import ROOT, kill_after_step, launch_script, signal_after_step

from neuclip_ds.launch import free_port, launch, metrics, run_command, summary

STEPS = 8
BASE = (
    f"--synthetic-samples 160 --steps {STEPS} --global-batch-size 16 --npn-prototypes 32 --npn-inner-steps 3"
    " --npn-restart-every 3 --lr 1e-3 --warmup 1 --save-every 2 --keep-last 10 --ds-config ds_configs/zero2.json"
).split()
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


def assert_identical(got, ref, rel=0.0, context=""):
    """`context` (e.g. the step a run was killed at) goes into every failure message."""
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1)), context
    for a, b in zip(got, ref):
        for k in KEYS:
            if rel == 0.0:
                assert a[k] == b[k], (context, k, a["step"], a[k], b[k])
            else:
                assert a[k] == pytest.approx(b[k], rel=rel), (context, k, a["step"], a[k], b[k])


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    from neuclip_ds.data.embedded import build_embedded_dataset

    root = tmp_path_factory.mktemp("ckpt_digits")
    build_embedded_dataset(root, seed=0, n_train=256, n_val=32, samples_per_shard=32)
    return root


@pytest.mark.parametrize(
    "loss,data,kill_step",  # fixed kill steps (reproducible): one between saves, one on a save step (every 2)
    [("neuclip", "synthetic", 5), ("fastclip", "webdataset", 4)],
)
def test_sigkill_then_resume_is_bit_exact(reference, tmp_path, small_set, loss, data, kill_step):
    """Kill every process of a 2-rank run once metrics.jsonl shows `kill_step`, resume, compare metrics.jsonl
    step by step. The webdataset case also restores the loader position (shard order, shuffle buffer, crops) and
    the u tables."""
    out = tmp_path / "run"
    webdata = ["--train-data", f"{small_set}/train/{{00000..00007}}.tar", "--tokenizer", str(small_set / "tokenizer")]
    extra = [] if data == "synthetic" else [*webdata, *"--train-num-samples 256 --dataset-size 256".split()]
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
    assert_identical(metrics(out), ref, context=f"killed after step {kill_step}")


def test_kill_during_save_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = [*BASE, "--output-dir", str(out)]
    monkeypatch.setenv("KILL_SAVE_STEP", "4")  # the launched ranks inherit it
    proc = launch_script(str(ROOT / "tests" / "scripts" / "kill_during_save.py"), args, nproc=2, check=False)
    assert proc.returncode != 0
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000002"  # `latest` did not move
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


def test_one_rank_zero0_resume_is_bit_exact(tmp_path):
    """The shipped `zero0` (no partitioning: what one rank needs) saves DeepSpeed's plain checkpoint, without ZeRO
    files; resuming it at step 4 continues the uninterrupted run exactly."""
    base = [*BASE, "--ds-config", "zero0", "--loss", "neuclip"]
    launch([*base, "--output-dir", str(tmp_path / "whole")])
    tag = tmp_path / "whole" / "checkpoints" / "step00000004"
    assert (tag / "mp_rank_00_model_states.pt").is_file() and not list(tag.glob("*optim_states.pt"))
    launch([*base, "--output-dir", str(tmp_path / "resumed"), "--resume", str(tag)])
    resumed = metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(5, STEPS + 1))
    whole = metrics(tmp_path / "whole")[4:]
    for a, b in zip(resumed, whole, strict=True):
        assert [a[k] for k in KEYS] == [b[k] for k in KEYS], a["step"]


def test_resume_bad_inputs_are_one_line_and_touch_nothing(tmp_path):
    out = tmp_path / "run"
    args = [*BASE, "--steps", "2", "--output-dir", str(out)]
    launch(args, nproc=1)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    cases = [
        (["--resume", str(tmp_path / "nowhere")], "does not exist"),
        (["--resume", "auto", "--preset", "ViT-B-32"], "--preset 'tiny', this run has 'ViT-B-32'"),
        (["--resume", "auto", "--loss", "mbcl"], "--loss 'neuclip', this run has 'mbcl'"),
        (["--resume", "auto", "--ds-config", "ds_configs/zero3.json"], "ZeRO stage 2, this run uses stage 3"),
    ]
    for extra, needle in cases:
        proc = launch([*args, *extra], nproc=1, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and needle in lines[-1] and lines[-1].startswith("neuclip-train: error:"), (
            extra,
            proc.stderr[-500:],
        )
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint_and_resume_continues_exactly(tmp_path):
    """SIGTERM to launchers/single_node.sh, as SLURM or Kubernetes send it, mid-run: both ranks save the same
    step and exit 0 (not killed, not left running); --resume auto then gives the uninterrupted run's metrics."""
    steps = 30
    args = [*BASE, "--steps", str(steps), "--save-every", "0"]
    launch([*args, "--output-dir", str(tmp_path / "ref")], nproc=2)
    out = tmp_path / "run"
    stopped = signal_after_step(
        ["bash", "launchers/single_node.sh", "2", *args, "--output-dir", str(out)],
        out,
        signal.SIGTERM,
        step=1,
        extra_env={"PYTHON": sys.executable},
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    k = len(metrics(out))
    assert 1 <= k < steps
    assert f"neuclip-train: stopped by SIGTERM at step {k} with a checkpoint" in stopped.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{k:08d}"
    assert (out / "checkpoints" / f"step{k:08d}" / "COMPLETE").is_file()
    launch([*args, "--output-dir", str(out), "--resume", "auto"], nproc=2)
    got, ref = metrics(out), metrics(tmp_path / "ref")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, steps + 1))
    for a, b in zip(got, ref):
        assert all(a[key] == b[key] for key in KEYS), (a["step"], [(a[key], b[key]) for key in KEYS])
    assert summary(out)["npn_checksums"] == summary(tmp_path / "ref")["npn_checksums"]


def test_slurm_time_limit_signal_saves_requeues_and_the_requeued_job_finishes(tmp_path):
    """launchers/slurm.sbatch under stand-ins for srun (one task) and scontrol: the USR1 that `--signal=B:USR1@180`
    sends before the time limit reaches the rank, which saves and exits 0; the script requeues the job, and the
    same script run again (the requeued job) continues from that checkpoint to the end, each step logged once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexport SLURM_PROCID=0 SLURM_LOCALID=0\nexec "$@"\n'
    )
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\nif [ "$1" = show ]; then echo 127.0.0.1; '
        f'else echo "$@" >> {tmp_path / "scontrol.log"}; fi\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    steps, out = 30, tmp_path / "run"
    job = ["bash", "launchers/slurm.sbatch", *BASE, *f"--steps {steps} --save-every 0".split()]
    job += ["--output-dir", str(out)]
    slurm_env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "MASTER_PORT": str(free_port()),
    }
    stopped = signal_after_step(job, out, signal.SIGUSR1, step=1, extra_env=slurm_env)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    k = len(metrics(out))
    assert 1 <= k < steps and (out / "checkpoints" / f"step{k:08d}" / "COMPLETE").is_file()
    finished = run_command(job, extra_env=slurm_env)
    assert [r["step"] for r in metrics(out)] == list(range(1, steps + 1))
    assert finished.returncode == 0 and summary(out)["final"]["step"] == steps
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # finished: not requeued again
