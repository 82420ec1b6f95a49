"""The training driver end to end on the demo data, as users run it (torchrun on the CPU):
the stage chain, exact resume after a SIGKILL, a kill during a checkpoint write, SIGTERM, and
non-finite losses. Losses are compared as printed (4 decimals) and through metrics.jsonl (full
float precision) for bitwise equality."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sail_megatron.data.cli import build_demo
from tests.helpers.multiprocess import free_port
from tests.helpers.processes import kill_tree, wait_for

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo") / "demo_data")


def _command(recipe, demo, run_dir, *overrides, nproc=1):
    data = "captions" if "pretrain" in recipe else "sft"
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "sail_megatron.train", "--config", str(RECIPES / recipe),
            "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
            f"data.tokenizer={demo / 'raw' / 'tokenizer'}", f"data.path={demo / data}", f"run.save_dir={run_dir}",
            "run.global_batch_size=2", *overrides]


def _train(recipe, demo, run_dir, *overrides, expect_rc=0):
    out = subprocess.run(_command(recipe, demo, run_dir, *overrides), capture_output=True, text=True, env=ENV,
                         timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == expect_rc, log[-4000:]
    return _printed_losses(out.stdout), log


def _printed_losses(stdout):
    return [float(x) for x in re.findall(r"^step +\d+/\d+ \| loss ([0-9.na]+)", stdout, re.M)]


def _metrics(run_dir):
    """step -> full-precision loss; the last record wins (a resumed run appends)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def _latest(run_dir):
    return (Path(run_dir) / "latest").read_text().strip()


SFT = "3-sft-knowledge.yaml"
FRESH = "run.init_from=null"


@pytest.fixture(scope="module")
def straight(demo, tmp_path_factory):
    """6 steps in one go: the reference every interrupted run must reproduce bitwise."""
    run_dir = tmp_path_factory.mktemp("straight")
    _train(SFT, demo, run_dir, "run.train_steps=6", "run.save_interval=100", FRESH)
    losses = _metrics(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    return losses


def test_exact_resume_after_sigkill(demo, straight, tmp_path):
    run = subprocess.Popen(_command(SFT, demo, tmp_path, "run.train_steps=6", "run.save_interval=3", FRESH),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        wait_for(lambda: (tmp_path / "latest").is_file(), timeout=300, poll=0.05, what="the step-3 checkpoint")
    finally:
        kill_tree(run.pid, signal.SIGKILL)  # the whole job dies at once, as when a node is lost
        run.wait()
    assert _latest(tmp_path) == "iter_00000003"
    _, log = _train(SFT, demo, tmp_path, "run.train_steps=6", "run.save_interval=3", FRESH)
    assert "resumed from" in log and _latest(tmp_path) == "iter_00000006"
    assert _metrics(tmp_path) == straight  # bitwise: full-precision floats equal


def test_kill_during_checkpoint_write_keeps_the_previous_one(demo, straight, tmp_path):
    run = subprocess.Popen(_command(SFT, demo, tmp_path, "run.train_steps=6", "run.save_interval=2", FRESH),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    partial = tmp_path / "iter_00000004.tmp"
    try:
        wait_for(partial.exists, timeout=300, what="the step-4 checkpoint write to start")
    finally:
        kill_tree(run.pid, signal.SIGKILL)
        run.wait()
    assert not (tmp_path / "iter_00000004").exists(), "the write finished before the kill: nothing was tested"
    assert _latest(tmp_path) == "iter_00000002"
    _, log = _train(SFT, demo, tmp_path, "run.train_steps=6", "run.save_interval=2", FRESH)
    assert "resumed from" in log and "iter_00000002" in log
    assert not partial.exists() and _latest(tmp_path) == "iter_00000006"
    assert _metrics(tmp_path) == straight


def test_sigterm_saves_and_exits(demo, tmp_path):
    run = subprocess.Popen(_command(SFT, demo, tmp_path, "run.train_steps=200", "run.save_interval=1000", FRESH),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                           start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, timeout=300, poll=0.05,
             what="two logged steps")
    os.killpg(run.pid, signal.SIGTERM)  # torchrun's group: it forwards SIGTERM to its ranks' groups
    log, _ = run.communicate(timeout=120)
    stopped_at = max(_metrics(tmp_path))
    assert re.search(rf"received SIGTERM: saved the checkpoint at step {stopped_at}; exiting", log), log[-3000:]
    assert _latest(tmp_path) == f"iter_{stopped_at:08d}" and stopped_at < 200
    assert "DataLoader worker" not in log  # the loader's workers outlived the signal


def test_nonfinite_steps_are_skipped_then_stop_the_run(demo, tmp_path):
    # lr 1e30 overflows the weights after one update: every later loss is NaN.
    losses, log = _train(SFT, demo, tmp_path, "run.train_steps=20", "optim.lr=1e30", "optim.vision_lr=null",
                         "optim.warmup_steps=0", "run.max_nonfinite_steps=3", FRESH, expect_rc=1)
    assert log.count("update skipped") == 3 and "3 consecutive steps had a non-finite loss" in log
    assert len(losses) == 4 and not (tmp_path / "latest").exists()


def test_stage_chain_with_logs_and_curves(demo, tmp_path):
    stages = ["1-pretrain-alignment.yaml", "2-pretrain-advance.yaml", SFT]
    previous = None
    for i, recipe in enumerate(stages):
        run_dir = tmp_path / str(i)
        init = f"run.init_from={previous}" if previous else FRESH
        losses, log = _train(recipe, demo, run_dir, "run.train_steps=2", init)
        assert len(losses) == 2 and ("initialized from" in log) == bool(previous)
        assert list(run_dir.glob("tensorboard/events.out.tfevents.*")) and (run_dir / "curves.png").stat().st_size
        previous = run_dir
    record = json.loads((tmp_path / "2" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "lr_vision", "lr_projector", "lr_language", "grad_norm", "tokens_per_s", "tflops_per_s",
                "packing_utilization", "data_wait_frac", "memory_gib", "skipped_samples", "eta_s"):
        assert record[key] is not None, key
    assert record["lr_vision"] < record["lr_language"]  # the SFT recipe trains the ViT 10x slower
    assert 0 < record["packing_utilization"] <= 1 and record["tflops_per_s"] > 0


def test_config_error_names_the_key_before_any_process_group(demo, tmp_path):
    _, log = _train(SFT, demo, tmp_path, "optim.schedule=linear", expect_rc=1)
    assert "optim.schedule" in log and not (tmp_path / "config.yaml").exists()
