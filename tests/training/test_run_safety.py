"""What an operator must be able to trust, through the real CLI: a new run never writes into an earlier
run's logs, a full disk during a save ends with one message (exit 2) and an intact earlier checkpoint, no
rank outlives its launcher, and overrides change only the keys they name."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.processes import kill_tree, wait_for
from tests.helpers.small_disk import small_filesystem
from tests.helpers.train_cli import ENV, train_command

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "examples" / "configs" / "tiny" / "3-sft-knowledge.yaml"


def _overrides(demo, run_dir, *extra, nproc=1):
    return [
        "parallel.tensor_model_parallel_size=1",
        "parallel.pipeline_model_parallel_size=1",
        f"data.tokenizer={demo / 'raw' / 'tokenizer'}",
        f"data.path={demo / 'sft'}",
        f"run.save_dir={run_dir}",
        f"run.global_batch_size={2 * nproc}",
        "run.init_from=null",
        "run.plot=false",
        *extra,
    ]


def _train(demo, run_dir, *extra):
    """One process, without torchrun (which reports any failed rank as its own exit code 1)."""
    out = subprocess.run(
        [sys.executable, "-m", "sail_megatron.train", "--config", str(SFT), *_overrides(demo, run_dir, *extra)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    return out.returncode, out.stdout + out.stderr


def test_a_fresh_run_sets_an_earlier_runs_logs_aside(demo, tmp_path):
    # An earlier run left its logs (its checkpoints are gone, or it never wrote one): this run starts fresh.
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.1.earlier").write_bytes(b"earlier")
    (run / "config.yaml").write_text("earlier: true\n")
    earlier = [{"step": s, "loss": 9.0} for s in (1, 2, 3)] + [{"step": 3, "valid_loss": 9.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier))
    (run / "curves.png").write_bytes(b"earlier")
    rc, log = _train(demo, run, "run.train_steps=2", "run.save_interval=100")
    assert rc == 0, log[-3000:]
    aside = run / "earlier-runs" / "1"
    assert "moved to" in log and str(aside) in log
    assert (aside / "config.yaml").read_text() == "earlier: true\n"
    assert [json.loads(x) for x in (aside / "metrics.jsonl").read_text().splitlines()] == earlier
    assert (aside / "tensorboard" / "events.out.tfevents.1.earlier").is_file() and (aside / "curves.png").is_file()
    ours = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ours] == [1, 2] and all(r["loss"] != 9.0 for r in ours)
    assert "earlier" not in (run / "config.yaml").read_text()
    assert not any(p.name.endswith(".earlier") for p in (run / "tensorboard").iterdir())


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_a_full_disk_during_a_save_says_so_and_keeps_the_last_checkpoint(demo, tmp_path, async_save):
    # A tiny checkpoint is about 10 MB: the step-2 save fits in 14 MB, the step-4 save does not.
    with small_filesystem(tmp_path / "disk", "14m") as disk:
        run = disk / "run"
        rc, log = _train(demo, run, "run.train_steps=4", "run.save_interval=2", f"run.async_save={async_save}")
        assert rc == 2, log[-3000:]
        errors = [line for line in log.splitlines() if " ERROR sail_megatron" in line]
        assert len(errors) == 1, log[-3000:]
        assert "could not write the step-4 checkpoint" in errors[0] and "the disk is full" in errors[0]
        assert "MiB free" in errors[0] and "(iter_00000002)" in errors[0]
        assert "Traceback" not in log
        assert (run / "latest").read_text().strip() == "iter_00000002"
        assert not (run / "iter_00000004").exists()


def test_no_rank_outlives_its_launcher(demo, tmp_path):
    run = tmp_path / "run"
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(
            train_command(SFT, _overrides(demo, run, "run.train_steps=400", "run.save_interval=2", nproc=2), 2),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
    try:
        wait_for(lambda: "step      3/" in log_path.read_text(), timeout=240, what="step 3")
        os.kill(launcher.pid, signal.SIGKILL)  # as the OOM killer or `kill -9` would
        launcher.wait()

        def ranks_gone():
            return not subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.strip()

        wait_for(ranks_gone, timeout=20, what="the ranks to die with their launcher")
    finally:
        kill_tree(launcher.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(run)], check=False)
    latest = (run / "latest").read_text().strip() if (run / "latest").exists() else None
    subprocess.run(["sleep", "3"])
    assert ((run / "latest").read_text().strip() if (run / "latest").exists() else None) == latest


def test_a_section_override_changes_only_the_keys_it_names(demo, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sail_megatron.train",
            "--check",
            "--config",
            str(SFT),
            *_overrides(demo, tmp_path / "run"),
            "data={seq_length: 256, max_tiles: 2}",
        ],
        capture_output=True,
        text=True,
        env={**ENV, "WORLD_SIZE": "1"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    changes = [line for line in out.stdout.splitlines() if line.startswith("override: ")]
    assert "override: data.seq_length: 512 -> 256" in changes, out.stdout
    assert "override: data.max_tiles: 4 -> 2" in changes, out.stdout
    # The rest of the section stays the recipe's (a replaced section would fall back to the defaults).
    assert not any(
        line.startswith(("override: data.max_tiles_per_pack", "override: data.template")) for line in changes
    )
