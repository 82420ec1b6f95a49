"""The launch scripts: two torchrun "nodes" of two processes each rendezvous on loopback and train
the tiny model at TP=2 x PP=2 through examples/launch/multi_node.sh, exactly as on a cluster."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.multiprocess import free_port
from tests.helpers.processes import kill_tree

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "examples" / "launch"


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh", "slurm.sbatch"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def _launch(script: str, demo, run_dir, *overrides: str):
    """The command line of a launch script training the tiny stage-1 recipe for 2 steps on the demo data."""
    return [
        "bash",
        str(LAUNCH / script),
        str(ROOT / "examples/configs/tiny/1-pretrain-alignment.yaml"),
        f"data.tokenizer={demo / 'raw' / 'tokenizer'}",
        f"data.path={demo / 'captions'}",
        f"run.save_dir={run_dir}",
        "run.train_steps=2",
        "run.init_from=null",
        "run.plot=false",
        *overrides,
    ]


def _launch_env(**settings: str):
    return {
        **os.environ,
        "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
        "PYTHON": sys.executable,
        "GPUS_PER_NODE": "2",
        **settings,
    }


def test_two_nodes_of_two_processes(demo, tmp_path):
    env = _launch_env(
        NNODES="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RDZV_ID="two-node-test",
        MAX_RESTARTS="0",  # a failure here is a test failure, not something to retry
    )
    args = _launch("multi_node.sh", demo, tmp_path / "run")
    nodes = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        for _ in range(2)
    ]
    try:
        logs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            kill_tree(node.pid)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    log = "\n".join(logs)
    assert "world 4 = TP 2 x PP 2 x DP 1" in log
    assert len(re.findall(r"^step +\d+/2 \|[^|\n]*\| loss", log, re.M)) == 2  # printed once, by global rank 0
    assert (tmp_path / "run" / "latest").read_text().strip() == "iter_00000002"


def test_a_rank_lost_before_the_process_group_does_not_desynchronize_the_restart(demo, tmp_path):
    # Rank 1 exits during start-up of the first attempt, before the process group exists (as after a "device
    # busy" or a file-system error). torchrun restarts both ranks, which must meet again at once: a short
    # process-group timeout turns any rendezvous under different keys into a failure instead of a long wait.
    out = subprocess.run(
        _launch(
            "single_node.sh",
            demo,
            tmp_path / "run",
            "parallel.tensor_model_parallel_size=1",
            "parallel.pipeline_model_parallel_size=1",
            "run.process_group_timeout_s=60",
            "run.inject_fault=exit@0:1",
        ),
        capture_output=True,
        text=True,
        env=_launch_env(MAX_RESTARTS="1"),
        cwd=ROOT,
        timeout=400,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "injecting fault: exit on rank 1 during start-up" in log
    assert "launch attempt 2 of at most 2" in log
    assert (tmp_path / "run" / "latest").read_text().strip() == "iter_00000002"


def test_nodes_launched_with_different_recipes_refuse_to_train(demo, tmp_path):
    # The same line must run on every node: here the second node was given another learning rate. Every
    # rank compares its resolved recipe (and code) before the first step, and every node exits naming the key.
    env = _launch_env(
        NNODES="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RDZV_ID="mismatch-test",
        MAX_RESTARTS="0",
    )
    lines = [
        _launch("multi_node.sh", demo, tmp_path / "run", "optim.lr=1e-4"),
        _launch("multi_node.sh", demo, tmp_path / "run", "optim.lr=1e-2"),
    ]
    nodes = [
        subprocess.Popen(line, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        for line in lines
    ]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            kill_tree(node.pid)
    assert all(n.returncode != 0 for n in nodes), "\n".join(log[-3000:] for log in logs)
    for log in logs:
        assert "config optim.lr: 0.0001 -> 0.01" in log, log[-3000:]
        assert not re.search(r"^step +1/", log, re.M)  # refused before the first step
