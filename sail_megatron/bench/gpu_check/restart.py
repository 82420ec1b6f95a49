"""`restart`: the launcher's restart path, as the launch scripts run it. torchrun starts two ranks of the demo
recipe (gloo on the CPU: two ranks cannot share one GPU under NCCL, and what is tested is torchrun's
rendezvous); rank 1 exits during start-up, before the process group exists, on the first launch attempt
only (run.inject_fault=exit@0:1). torchrun must restart the job once, and the second attempt must train to
its last step."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from sail_megatron.bench.gpu_check.helpers import Figures
from sail_megatron.bench.gpu_check.runner import Part, kill_part
from sail_megatron.bench.gpu_check.worker import read_figures, worker_command

NAME = "restart"
RECIPE = "examples/configs/tiny/demo.yaml"
FAULT = "exit@0:1"  # rank 1 exits at step 0, i.e. during start-up, once per run folder
TRAIN_STEPS = 3
TORCHRUN_LIMIT_S = 120  # the part's limit less the demo dataset's build (about 10 s) and some slack
# torchrun's own log line (at LOGLEVEL=INFO) when a failed worker group is started again.
RESTART_LINE = "will restart worker group"
LAUNCH_ENV = {
    "CUDA_VISIBLE_DEVICES": "",
    # What the launch scripts export: each rendezvous round gets a fresh TCPStore instead of one kept
    # across restarts.
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    "LOGLEVEL": "INFO",  # torchrun logs its restart decision at INFO
    "OMP_NUM_THREADS": "1",
}


def train_argv(demo: Path, run_dir: Path, python: str = sys.executable) -> List[str]:
    return [
        python,
        "-m",
        "torch.distributed.run",  # torchrun
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "-m",
        "sail_megatron.train",
        "--config",
        RECIPE,
        "parallel.tensor_model_parallel_size=1",
        "parallel.pipeline_model_parallel_size=1",
        f"data.path={demo / 'blend.yaml'}",
        f"data.tokenizer={demo / 'raw' / 'tokenizer'}",
        f"run.save_dir={run_dir}",
        f"run.train_steps={TRAIN_STEPS}",
        "run.global_batch_size=2",
        "run.eval_interval=0",
        "run.process_group_timeout_s=60",
        f"run.inject_fault={FAULT}",
        "run.plot=false",
        "run.tensorboard=false",
    ]


def last_step(run_dir: Path, log: str) -> Optional[int]:
    """The last training step the run logged: metrics.jsonl, else the console's `step N/M | loss` lines."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():
        steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines() if '"loss"' in line]
        steps = [s for s in steps if isinstance(s, int)]
        if steps:
            return max(steps)
    printed = [int(s) for s in re.findall(r"^step +(\d+)/\d+ \|[^|\n]*\| loss", log, re.M)]
    return max(printed) if printed else None


def judge(returncode: Optional[int], log: str, step: Optional[int]) -> List[str]:
    """What is wrong (empty: it passed): torchrun exits 0, the run reaches its last step, and the log shows a
    restart."""
    problems = []
    if returncode != 0:
        problems.append(
            f"torchrun did not finish within {TORCHRUN_LIMIT_S} s"
            if returncode is None
            else f"torchrun exited with {returncode}"
        )
    if step != TRAIN_STEPS:
        problems.append(f"the run reached step {step} of {TRAIN_STEPS}")
    if RESTART_LINE not in log:
        problems.append("torchrun's log shows no restart")
    return problems


def _run_and_echo(argv: List[str], env: Dict[str, str], cwd: Path, limit_s: float) -> Dict[str, Any]:
    """Run `argv` in its own session, copying its output to ours; killed with its ranks after `limit_s`."""
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: List[str] = []

    def echo():
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        returncode: Optional[int] = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        kill_part(proc.pid)  # torchrun starts ranks in sessions of their own: the whole tree goes
        proc.wait()
        returncode = None
    reader.join(timeout=10)
    return {"returncode": returncode, "log": "".join(lines)}


def worker(fig: Figures, root: Path) -> None:
    from sail_megatron.data.cli import build_demo

    demo, run_dir = fig.path.parent / "restart-demo", fig.path.parent / "restart-run"
    for folder in (demo, run_dir):
        shutil.rmtree(folder, ignore_errors=True)
    began = time.perf_counter()
    build_demo(demo)  # what `sail-data demo` writes
    fig.figures["demo dataset (s)"] = time.perf_counter() - began
    argv = train_argv(demo, run_dir)
    fig.figures["command"] = " ".join([*(f"{k}={v!r}" for k, v in LAUNCH_ENV.items()), "python", *argv[1:]])
    fig.save()
    began = time.perf_counter()
    run = _run_and_echo(argv, {**os.environ, **LAUNCH_ENV}, root, TORCHRUN_LIMIT_S)
    step = last_step(run_dir, run["log"])
    fig.figures.update(
        {
            "torchrun (s)": time.perf_counter() - began,
            "torchrun exit code": run["returncode"],
            "restarts": run["log"].count(RESTART_LINE),
            "fault injected": "injecting fault" in run["log"],
            "last step": step,
        }
    )
    for problem in judge(run["returncode"], run["log"], step):
        fig.fail(problem)
    fig.summary = (
        f"restarts {fig.figures['restarts']}, step {step}/{TRAIN_STEPS} reached, torchrun exit code "
        f"{run['returncode']} after {fig.figures['torchrun (s)']:.0f} s"
    )


def part(timeout_s: float) -> Part:
    return Part(
        NAME,
        f"torchrun --standalone --nproc-per-node 2 --max-restarts 1 of the tiny demo recipe ({TRAIN_STEPS} steps, "
        "gloo on the CPU, run.process_group_timeout_s=60, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1); rank 1 exits "
        f"during start-up on the first launch attempt (run.inject_fault={FAULT}).",
        timeout_s,
        worker_command(NAME),
        read_figures(NAME),
        in_default_run=False,  # CI runs the same drill on the CPU; --only restart runs it on the GPU machine
    )
