"""The training driver end to end on the demo data: a stage chain, and exact resume after a restart."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sail_megatron.data.cli import build_demo
from tests.helpers.multiprocess import free_port

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo") / "demo_data")


def _train(recipe, demo, run_dir, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(free_port()),
           "-m", "sail_megatron.train", "--config", str(RECIPES / recipe),
           "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
           f"data.tokenizer={demo / 'raw' / 'tokenizer'}", f"run.save_dir={run_dir}", "run.global_batch_size=2",
           *overrides]
    data = "captions" if "pretrain" in recipe else "sft"
    cmd.append(f"data.path={demo / data}")
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [float(x) for x in re.findall(r"^step +\d+/\d+ \| loss ([0-9.]+)", out.stdout, re.M)], out.stdout + out.stderr


def test_exact_resume_after_restart(demo, tmp_path):
    straight, _ = _train("3-sft-knowledge.yaml", demo, tmp_path / "a", "run.train_steps=4", "run.save_interval=100",
                         "run.init_from=null")
    first, _ = _train("3-sft-knowledge.yaml", demo, tmp_path / "b", "run.train_steps=2", "run.init_from=null")
    second, log = _train("3-sft-knowledge.yaml", demo, tmp_path / "b", "run.train_steps=4", "run.init_from=null")
    assert "resumed from" in log and (tmp_path / "b" / "latest").read_text().strip() == "iter_00000004"
    assert len(straight) == 4 and first + second == straight  # bitwise: same floats printed to 4 places
    assert (tmp_path / "b" / "config.yaml").is_file()


def test_stage_chain(demo, tmp_path):
    a, _ = _train("1-pretrain-alignment.yaml", demo, tmp_path / "1", "run.train_steps=2")
    b, log = _train("2-pretrain-advance.yaml", demo, tmp_path / "2", "run.train_steps=2", f"run.init_from={tmp_path / '1'}")
    assert len(a) == len(b) == 2 and "initialized from" in log
