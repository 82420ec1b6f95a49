"""Running `sail_megatron.train` under torchrun as users do, and reading what it wrote."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

from tests.helpers.multiprocess import free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# The GPU recipes' precision and optimizer settings (examples/configs/sail-vl-*/_base.yaml), which the
# CPU runs through the same megatron-core branches as a GPU.
GPU_RECIPE_PRECISION = (
    "precision.dtype=bf16",
    "parallel.use_distributed_optimizer=true",
    "parallel.overlap_grad_reduce=true",
    "parallel.overlap_param_gather=true",
)


def torchrun_command(module: str, args: Sequence[str], nproc: int = 1, launcher: Sequence[str] = ()) -> List[str]:
    """`torchrun --nproc-per-node N [LAUNCHER FLAGS] -m MODULE ARGS` on a free loopback port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        *launcher,
        "-m",
        module,
        *args,
    ]


def train_command(config: Path, overrides: Sequence[str], nproc: int = 1, launcher: Sequence[str] = ()) -> List[str]:
    return torchrun_command("sail_megatron.train", ["--config", str(config), *overrides], nproc, launcher)


def run_train(config: Path, overrides: Sequence[str], nproc: int = 1, expect_rc: int = 0):
    """(losses as printed, whole log)."""
    out = subprocess.run(train_command(config, overrides, nproc), capture_output=True, text=True, env=ENV, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == expect_rc, log[-4000:]
    return printed_losses(out.stdout), log


def printed_losses(stdout: str) -> List[float]:
    return [float(x) for x in re.findall(r"^step +\d+(?:/\d+)? \|[^|\n]*\| loss ([0-9.na]+)", stdout, re.M)]


def metrics(run_dir: Path) -> dict:
    """step -> full-precision training loss; the last record wins (a resumed run appends)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def valid_metrics(run_dir: Path) -> dict:
    """step -> full-precision validation loss."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["valid_loss"] for r in records if "valid_loss" in r}


def last_record(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.jsonl").read_text().splitlines()[-1])
