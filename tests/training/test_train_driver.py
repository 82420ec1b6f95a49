"""The training driver end to end on the demo data, as users run it (torchrun on the CPU):
the stage chain, exact resume after a SIGKILL, a kill during a checkpoint write, SIGTERM, and
non-finite losses. Losses are compared as printed (4 decimals) and through metrics.jsonl (full
float precision) for bitwise equality. The resume tests train the tiny AIMv2 + Qwen3 model (the
SAIL-VL2 layout, tied embeddings); the others the tiny InternViT + Qwen2 model."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sail_megatron.config import ConfigError
from sail_megatron.data.prepare import prepare
from sail_megatron.training.checkpoint_files import CheckpointError
from sail_megatron.training.resume import StartPoint, choose_start
from sail_megatron.training.startup import prepare_config
from tests.helpers.multiprocess import free_port
from tests.helpers.processes import kill_tree, wait_for
from tests.helpers.train_cli import ENV, GPU_RECIPE_PRECISION, printed_losses, train_command
from tests.helpers.train_cli import metrics as _metrics

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny"


def _command(recipe, demo, run_dir, *overrides, nproc=1, data=None, launcher=()):
    data = data or (demo / ("captions" if "pretrain" in recipe else "sft"))
    return train_command(
        RECIPES / recipe,
        [
            "parallel.tensor_model_parallel_size=1",
            "parallel.pipeline_model_parallel_size=1",
            f"data.tokenizer={demo / 'raw' / 'tokenizer'}",
            f"data.path={data}",
            f"run.save_dir={run_dir}",
            f"run.global_batch_size={2 * nproc}",
            *overrides,
        ],
        nproc,
        launcher,
    )


def _train(recipe, demo, run_dir, *overrides, expect_rc=0, nproc=1, data=None, launcher=()):
    out = subprocess.run(
        _command(recipe, demo, run_dir, *overrides, nproc=nproc, data=data, launcher=launcher),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    log = out.stdout + out.stderr
    assert out.returncode == expect_rc, log[-4000:]
    return printed_losses(out.stdout), log


def _latest(run_dir):
    return (Path(run_dir) / "latest").read_text().strip()


SFT = "3-sft-knowledge.yaml"
FRESH = "run.init_from=null"
SAIL_VL2 = "model_preset=tiny-sail-vl2"
ASYNC = "run.async_save=true"  # background checkpoint writes: what the interrupted runs below write
# The exact-resume tests run what the GPU recipes run: bf16, the distributed optimizer with both overlaps,
# on 2 data-parallel processes.
GPU_LIKE = dict(nproc=2)


@pytest.fixture(scope="module")
def straight_run(demo, tmp_path_factory):
    """6 steps in one go: the reference every interrupted run must reproduce bitwise."""
    run_dir = tmp_path_factory.mktemp("straight")
    _train(
        SFT,
        demo,
        run_dir,
        "run.train_steps=6",
        "run.save_interval=100",
        FRESH,
        SAIL_VL2,
        *GPU_RECIPE_PRECISION,
        **GPU_LIKE,
    )
    return run_dir


@pytest.fixture(scope="module")
def straight(straight_run):
    losses = _metrics(straight_run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    return losses


RESTARTS = ("--max-restarts", "2")  # what the launch scripts pass torchrun (their MAX_RESTARTS)


def _leftover_processes(run_dir) -> str:
    """Processes of the run still alive (ranks, loader workers, checkpoint writers share its command line)."""
    out = subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True)
    return out.stdout.strip()


def test_a_killed_and_then_a_hung_rank_restart_the_job_which_resumes_by_itself(demo, straight, tmp_path):
    # One drill, two faults. A checkpoint every step, written in the background: a save first completes the
    # previous one, so when rank 1 is SIGKILLed as it starts step 4, step 2's checkpoint is complete and step
    # 3's is not, whatever the machine's speed. torchrun restarts both ranks, which meet again and resume from
    # step 2. Then rank 1 stops at step 6 (as in a dead collective): both ranks' watchdogs dump their stacks
    # (the first to fire waits for the other's dump) and exit, torchrun restarts the job again, and it resumes
    # from its newest complete checkpoint, step 4's. It finishes with the uninterrupted run's losses, bitwise.
    _, log = _train(
        SFT,
        demo,
        tmp_path,
        "run.train_steps=6",
        "run.save_interval=1",
        "run.inject_fault=kill@4:1,hang@6:1",
        "run.step_timeout_s=15",
        FRESH,
        SAIL_VL2,
        ASYNC,
        *GPU_RECIPE_PRECISION,
        launcher=RESTARTS,
        **GPU_LIKE,
    )
    assert "injecting fault: kill on rank 1 at step 4" in log and "launch attempt 3 of at most 3" in log, log[-3000:]
    assert "past its limit of 15.0 s" in log and log.count("resumed from") == 2 and "iter_00000002" in log
    stacks = {p.name: p.read_text() for p in (tmp_path / "hangs").glob("rank_*.txt")}
    assert sorted(stacks) == ["rank_0.txt", "rank_1.txt"]
    assert "faults.py" in stacks["rank_1.txt"]  # the hung rank's own stack shows where it stopped
    assert "train_step" in stacks["rank_0.txt"]  # the other waits inside the step for it
    assert _latest(tmp_path) == "iter_00000006" and _metrics(tmp_path) == straight
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "resume"] == [2, 4]  # each restart marks its resume
    assert not _leftover_processes(tmp_path)  # no loader worker of a killed rank outlived it


def test_kill_during_checkpoint_write_keeps_the_previous_one(demo, straight, tmp_path):
    run = subprocess.Popen(
        _command(
            SFT,
            demo,
            tmp_path,
            "run.train_steps=6",
            "run.save_interval=2",
            FRESH,
            SAIL_VL2,
            ASYNC,
            *GPU_RECIPE_PRECISION,
            **GPU_LIKE,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    partial = tmp_path / "iter_00000004.tmp"
    try:
        wait_for(partial.exists, timeout=300, what="the step-4 checkpoint write to start")
    finally:
        kill_tree(run.pid, signal.SIGKILL)
        run.wait()
    assert not (tmp_path / "iter_00000004").exists(), "the write finished before the kill: nothing was tested"
    assert _latest(tmp_path) == "iter_00000002"
    _, log = _train(
        SFT,
        demo,
        tmp_path,
        "run.train_steps=6",
        "run.save_interval=2",
        FRESH,
        SAIL_VL2,
        *GPU_RECIPE_PRECISION,
        **GPU_LIKE,
    )
    assert "resumed from" in log and "iter_00000002" in log
    assert not partial.exists() and _latest(tmp_path) == "iter_00000006"
    assert _metrics(tmp_path) == straight


@pytest.mark.parametrize(
    "sig,writes", [(signal.SIGTERM, ASYNC), (signal.SIGINT, "run.async_save=false")], ids=["SIGTERM-async", "SIGINT"]
)
def test_stop_signal_saves_and_exits(demo, tmp_path, sig, writes):
    run = subprocess.Popen(
        _command(SFT, demo, tmp_path, "run.train_steps=200", "run.save_interval=1000", FRESH, writes),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    wait_for(
        lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2,
        timeout=300,
        poll=0.05,
        what="two logged steps",
    )
    os.killpg(run.pid, sig)  # torchrun's group (SLURM, Ctrl-C): torchrun passes it on to its ranks' groups
    log, _ = run.communicate(timeout=120)
    stopped_at = max(_metrics(tmp_path))
    assert re.search(rf"received {sig.name}: saved the checkpoint at step {stopped_at}; exiting", log), log[-3000:]
    assert _latest(tmp_path) == f"iter_{stopped_at:08d}" and stopped_at < 200
    assert "DataLoader worker" not in log  # the loader's workers outlived the signal
    if sig == signal.SIGINT:  # under torchrun a second Ctrl-C becomes SIGTERM: no abort is promised
        assert log.count("interrupted: saving a checkpoint") == 1 and "Ctrl-C again" not in log, log[-3000:]


def test_nonfinite_steps_are_skipped_then_stop_the_run(demo, tmp_path):
    # lr 1e30 overflows the weights after one update: every later loss is NaN.
    losses, log = _train(
        SFT,
        demo,
        tmp_path,
        "run.train_steps=20",
        "optim.lr=1e30",
        "optim.vision_lr=null",
        "optim.warmup_steps=0",
        "run.max_nonfinite_steps=3",
        FRESH,
        expect_rc=1,
    )
    assert log.count("update skipped") == 3 and "3 consecutive steps had a non-finite loss" in log
    assert len(losses) == 4 and not (tmp_path / "latest").exists()


def test_init_from_keeps_the_trained_weights_in_bf16(demo, tmp_path):
    # bf16 weights have fp32 copies in the optimizer: a weights-only load must refresh them, or the
    # first update puts the untrained weights back (the loss jumps back up at step 2).
    trained, _ = _train(
        SFT,
        demo,
        tmp_path / "a",
        "run.train_steps=8",
        "optim.lr=3e-3",
        "optim.vision_lr=null",
        "optim.warmup_steps=0",
        "optim.decay_steps=100",
        FRESH,
        *GPU_RECIPE_PRECISION,
        **GPU_LIKE,
    )
    assert trained[-1] < trained[0] - 0.6, trained  # the first stage learned something visible
    after, log = _train(
        SFT,
        demo,
        tmp_path / "b",
        "run.train_steps=3",
        "optim.lr=1e-5",
        "optim.vision_lr=null",
        "optim.warmup_steps=0",
        f"run.init_from={tmp_path / 'a'}",
        *GPU_RECIPE_PRECISION,
        **GPU_LIKE,
    )
    assert "initialized from" in log
    assert max(after) < trained[0] - 0.5, (trained, after)


@pytest.fixture(scope="module")
def mostly_text(demo, tmp_path_factory):
    """SFT data in which most samples have no image: most micro-batches carry no tiles."""
    root = tmp_path_factory.mktemp("mostly_text")
    records = [json.loads(line) for line in (demo / "raw" / "sft.jsonl").read_text().splitlines()]
    with_image = [r for r in records if "image" in r][:2]
    text = [
        {
            "id": f"text-{i}",
            "conversations": [
                {"from": "human", "value": f"Count to {i} please."},
                {"from": "gpt", "value": " ".join(str(k) for k in range(i + 1))},
            ],
        }
        for i in range(30)
    ]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text + with_image))
    prepare(root / "sft.jsonl", demo / "raw" / "images", root / "shards", shard_size=8)
    return root / "shards"


def test_micro_batches_without_tiles_train_every_part(demo, mostly_text, tmp_path):
    # Overlapped gradient reduction needs a gradient for every vision parameter in every micro-batch.
    losses, log = _train(
        SFT,
        demo,
        tmp_path,
        "run.train_steps=3",
        "data.packing=false",
        FRESH,
        *GPU_RECIPE_PRECISION,
        nproc=2,
        data=mostly_text,
    )
    assert len(losses) == 3 and all(loss == loss for loss in losses), log[-3000:]
    assert "update skipped" not in log


def test_vision_data_layout_decodes_each_image_once_per_replica(demo, mostly_text, tmp_path):
    # TP=2 with the vision encoder whole on both ranks: each image is decoded and encoded by one of them
    # (text-only micro-batches run the blank tile on both), under the GPU recipes' precision and overlaps,
    # each rank's ViT calls padded to power-of-two tile buckets.
    losses, log = _train(
        SFT,
        demo,
        tmp_path,
        "run.train_steps=3",
        "data.packing=false",
        FRESH,
        *GPU_RECIPE_PRECISION,
        "parallel.tensor_model_parallel_size=2",
        "parallel.vision_parallel=data",
        "precision.vision_tile_buckets=pow2",
        "run.global_batch_size=4",
        nproc=2,
        data=mostly_text,
    )
    assert len(losses) == 3 and all(loss == loss for loss in losses), log[-3000:]
    assert "update skipped" not in log
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert any(r["images_per_step"] for r in steps), steps
    for r in steps:
        assert r["decoded_images_per_rank_mean"] * 2 == pytest.approx(r["images_per_step"])
        assert r["decode_copies"] in (None, 1.0) and r["decoded_images_per_rank_max"] <= r["images_per_step"]
        # The ViT ran every decoded tile plus blank and bucket padding: 4 micro-batches per rank and step
        # (DP=1), each at least one (blank) tile, at most twice its own tiles (power-of-two buckets).
        own, ran = r["decoded_tiles_per_rank_mean"], r["vit_tiles_per_rank_mean"]
        assert max(own, 4) <= ran <= 2 * own + 4
        assert r["vit_padding_fraction"] == pytest.approx(1 - own / ran)  # text-only steps: all blank (1.0)


def test_fp16_backs_off_the_loss_scale_and_trains(demo, tmp_path):
    # 2**14 overflows this model's fp16 gradients at first (the per-token loss is a sum until the
    # gradients are reduced); the scaler halves it until they fit, then the run trains.
    losses, log = _train(
        SFT,
        demo,
        tmp_path,
        "run.train_steps=10",
        "precision.dtype=fp16",
        "optim.lr=1e-3",
        "optim.vision_lr=null",
        "optim.warmup_steps=0",
        "optim.initial_loss_scale=16384",
        "optim.loss_scale_hysteresis=1",
        "run.max_nonfinite_steps=2",
        FRESH,
        "parallel.use_distributed_optimizer=true",
        nproc=2,
    )
    overflows = len(re.findall("fp16 gradients overflowed", log))
    assert overflows >= 1, log[-3000:]  # the scaler saw the overflow and backed off ...
    assert overflows <= 5 and "non-finite" not in log  # ... and the steps after it updated the weights
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["loss_scale"] < 16384 and record["overflow_steps"] == overflows
    assert losses[-1] < losses[0]


def test_resume_of_another_model_is_refused_and_changes_nothing(demo, straight_run, tmp_path):
    shutil.copytree(straight_run, tmp_path / "run")
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    _, log = _train(
        SFT, demo, tmp_path / "run", "run.train_steps=8", "model.language.num_layers=2", FRESH, SAIL_VL2, expect_rc=1
    )  # torchrun's code; the rank's own is 2
    assert "holds a checkpoint of another model" in log and "num_layers 4 there vs 2 here" in log, log[-3000:]
    assert "exitcode  : 2" in log and "[rank0]: Traceback" not in log
    assert (tmp_path / "run" / "config.yaml").read_text() == recorded  # the untouched checkpoints still export


def _args(demo, *overrides):
    return SimpleNamespace(
        config=str(RECIPES / SFT),
        overrides=[
            "parallel.tensor_model_parallel_size=1",
            "parallel.pipeline_model_parallel_size=1",
            f"data.tokenizer={demo / 'raw' / 'tokenizer'}",
            f"data.path={demo / 'sft'}",
            FRESH,
            *overrides,
        ],
    )


@pytest.mark.parametrize(
    "override,field",
    [
        ("data.tokenizer=/nonexistent/tokenizer", "data.tokenizer"),
        ("data.tokenizer={empty}", "data.tokenizer"),
        ("data.path=/nonexistent/data", "data.path"),
        ("data.path={empty}", "data.path"),
        ("data.path={demo}/raw/sft.jsonl", "data.path"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.schedule=linear", "optim.schedule"),
        ("run.resume=maybe", "run.resume"),
        ("run.inject_fault=kill", "run.inject_fault"),
        ("run.step_timeout_s=120 run.process_group_timeout_s=60", "run.step_timeout_s"),
    ],
)
def test_user_errors_are_found_before_any_process_group(demo, tmp_path, override, field):
    with pytest.raises(ConfigError) as found:
        prepare_config(_args(demo, *override.format(empty=tmp_path, demo=demo).split()), world_size=1)
    assert found.value.field == field and len(str(found.value).splitlines()) <= 2


def test_damaged_checkpoints_are_named_before_the_model_is_built(demo, straight_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    newest = sorted(run.glob("iter_*"))[-1]
    shard = sorted(newest.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated shard: a bare EOFError deep in a load otherwise
    with pytest.raises(CheckpointError, match=shard.name):
        prepare_config(_args(demo, f"run.save_dir={run}", SAIL_VL2), world_size=1)
    with pytest.raises(CheckpointError, match="nonexistent"):
        prepare_config(_args(demo, "run.init_from=/nonexistent/run"), world_size=1)


def test_a_run_continues_on_one_data_parallel_rank_and_back_on_two(demo, straight_run, tmp_path):
    # Model, optimizer (saved as dp_reshardable) and schedule reshard to DP=1 and back; the data position
    # goes along stream by stream (2 ranks x 1 loader worker = 1 rank x 2 workers; exactness is checked
    # against energon in tests/data/test_loader_state.py), and the log says what changed.
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    losses, log = _train(
        SFT, demo, run, "run.train_steps=8", "run.save_interval=100", FRESH, SAIL_VL2, *GPU_RECIPE_PRECISION
    )
    assert "data.num_workers 1 -> 2" in log and "from data-parallel size 2 to 1" in log, log[-3000:]
    assert len(losses) == 2 and _latest(run) == "iter_00000008"
    assert abs(losses[0] - _metrics(straight_run)[6]) < 0.5  # the trained weights and moments came along
    losses, log = _train(
        SFT,
        demo,
        run,
        "run.train_steps=10",
        "run.save_interval=100",
        FRESH,
        SAIL_VL2,
        *GPU_RECIPE_PRECISION,
        **GPU_LIKE,
    )
    assert "data.num_workers 1 -> 1" not in log and "from data-parallel size 1 to 2" in log, log[-3000:]
    assert len(losses) == 2 and _latest(run) == "iter_00000010"


def test_a_damaged_newest_checkpoint_is_passed_over_for_an_older_good_one(straight_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    newest = sorted(run.glob("iter_*"))[-1]
    older = run / "iter_00000003"
    shutil.copytree(newest, older)  # a complete older checkpoint (the file checks read names and sizes)
    shard = sorted(newest.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    begin = choose_start(run, "auto", init_from="/never/used")
    assert begin.resume == older and begin.init_from is None
    (line,) = begin.passed_over
    assert line.startswith(newest.name) and shard.name in line
    assert "names 'iter_00000006'" in begin.pointer_note  # `latest` still names the damaged one
    with pytest.raises(ConfigError, match="already holds 2 checkpoints"):
        choose_start(run, "never")
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        choose_start(tmp_path / "empty", "required")
    assert choose_start(tmp_path / "empty", "auto") == StartPoint(None, None)


def _single_process(demo, config, *overrides, env=None):
    """`python -m sail_megatron.train` without torchrun: the rank's own exit code and output."""
    command = [sys.executable, "-m", "sail_megatron.train", "--config", str(config), *_args(demo, *overrides).overrides]
    return subprocess.run(command, capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=300)


def test_yaml_syntax_error_is_two_lines_and_exit_2(demo, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inherit: _base.yaml\noptim: {lr: 1e-4\n")
    out = _single_process(demo, bad)
    assert out.returncode == 2 and "is not valid YAML at line" in out.stderr and "Traceback" not in out.stderr


def test_busy_master_port_suggests_the_fix(demo, tmp_path):
    import socket

    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        out = _single_process(
            demo,
            RECIPES / SFT,
            f"run.save_dir={tmp_path / 'run'}",
            env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
        )
    assert out.returncode == 2 and "MASTER_PORT" in out.stderr, out.stderr[-2000:]
