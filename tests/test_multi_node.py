"""Several nodes, tested on one machine: two "nodes" of one rank each on localhost give the loss curve of one node
with two ranks, through the commands a cluster user runs: launchers/multi_node.sh started once per node (DeepSpeed's
launcher without ssh, NODE_RANK) and launchers/slurm.sbatch (under a stand-in srun that starts one task per node)."""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from neuclip_ds.launch import REPO_ROOT, cpu_env, free_port, launch, metrics, read_back

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
    """Start every command at once (the nodes of one job), wait for all; each must exit 0. Output goes to files (a
    node printing more than a pipe holds would block), and the first node to fail ends the others at once: its
    peers would otherwise wait for it until the timeout. A failure shows every node's output."""
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in commands]
        children = []
        try:
            for cmd, env, log in zip(commands, envs, logs):
                children.append(
                    subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
                )  # fmt: skip
            deadline = time.monotonic() + timeout
            while any(child.poll() is None for child in children):
                if any(child.poll() not in (None, 0) for child in children) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        codes = [child.returncode for child in children]
        if codes != [0] * len(commands):
            why = f"timed out after {timeout} s" if time.monotonic() > deadline else "a node failed"
            nodes = [
                f"--- node {i}: exit {code} ---\n{read_back(log)[-3000:]}"
                for i, (code, log) in enumerate(zip(codes, logs))
            ]
            raise AssertionError("\n".join([why, *nodes]))


def test_run_together_stops_the_other_nodes_when_one_fails():
    """A node that fails ends the job at once (its peer would wait for it until the timeout), and every node's
    output is in the report; a node's output larger than a pipe holds does not block it."""
    py = sys.executable
    loud = [
        py,
        "-c",
        "import sys, time; sys.stdout.write('x' * 200_000 + 'loud done'); sys.stdout.flush(); time.sleep(60)",
    ]
    failing = [py, "-c", "import sys, time; time.sleep(1); print('node 1 broke'); sys.exit(3)"]
    started = time.monotonic()
    with pytest.raises(AssertionError) as err:
        run_together([loud, failing], [cpu_env(), cpu_env()], timeout=50)
    assert time.monotonic() - started < 30
    report = str(err.value)
    assert report.startswith("a node failed") and "node 1: exit 3" in report and "node 1 broke" in report
    assert "loud done" in report and f"node 0: exit {-signal.SIGKILL}" in report


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
