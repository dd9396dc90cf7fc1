"""Several nodes, tested on one machine: two "nodes" of one rank each on localhost give the loss curve of one node
with two ranks, through the commands a cluster user runs: launchers/multi_node.sh started once per node (DeepSpeed's
launcher without ssh, NODE_RANK) and launchers/slurm.sbatch (under a stand-in srun that starts one task per node)."""

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from neuclip_ds.launch import REPO_ROOT, cpu_env, free_port, launch, metrics

ARGS = ["--synthetic-samples", "64", "--steps", "6", "--global-batch-size", "16", "--npn-prototypes", "16"]
KEYS = ("loss", "tau", "lr")


@pytest.fixture(scope="module")
def one_node_two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("one_node") / "run"
    launch([*ARGS, "--output-dir", str(out)], nproc=2)
    return metrics(out)


def assert_same_curve(got: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 7))
    for a, b in zip(got, ref):
        for key in KEYS:  # the same ranks and data; only the all-reduce path may differ (gloo vs shared memory)
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key, a[key], b[key])


def run_together(commands: list[list[str]], envs: list[dict], timeout: int = 600) -> None:
    """Start every command at once (the nodes of one job), wait for all; each must exit 0."""
    children = [
        subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
        for cmd, env in zip(commands, envs)
    ]  # fmt: skip
    try:
        outputs = [child.communicate(timeout=timeout)[0] for child in children]
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
    for child, output in zip(children, outputs):
        assert child.returncode == 0, output[-3000:]


def test_multi_node_sh_two_nodes_without_ssh(one_node_two_ranks, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    job = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    command = ["bash", "launchers/multi_node.sh", str(hostfile), *ARGS, "--output-dir", str(out)]
    run_together([command, command], [cpu_env(extra_env={**job, "NODE_RANK": str(node)}) for node in (0, 1)])
    assert_same_curve(metrics(out), one_node_two_ranks)


def test_slurm_sbatch_two_nodes(one_node_two_ranks, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun --ntasks-per-node=1 on 2 nodes: task i on node i, each the only task there
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\npids=()\n"
        'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i "$@" & pids+=($!); '
        'done\nrc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n'
    )
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1" = show ] && echo 127.0.0.1\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    out = tmp_path / "run"
    slurm = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "SLURM_JOB_ID": "7",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_SUBMIT_DIR": str(REPO_ROOT),
        "MASTER_PORT": str(free_port()),
    }
    run_together([["bash", "launchers/slurm.sbatch", *ARGS, "--output-dir", str(out)]], [cpu_env(extra_env=slurm)])
    assert_same_curve(metrics(out), one_node_two_ranks)
