"""A run folder read while its training prunes the checkpoint being read (`run.keep_last`) is no damaged
checkpoint: the readers (`read_checkpoint`, and through it sail-convert mcore-to-hf / verify and sail-chat)
say so in one line and read the checkpoint `latest` names now; a run pruning faster than it can be read,
and an iter folder passed itself and pruned, end in a clear error.

The pruning is deterministic: the trainer's save-and-prune (tests/helpers/pruning_run.py) runs inside the
read, after the reader resolved `latest` and before it reads the files.
"""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sail_megatron.training.checkpoint_files import CheckpointError, read_checkpoint
from tests.helpers.pruning_run import prune_like_the_trainer

REPO = Path(__file__).resolve().parents[2]
FIRST, SECOND = "iter_00000000", "iter_00000001"


@pytest.fixture
def run(tiny_checkpoints, tmp_path) -> Path:
    """A run folder with one checkpoint (`latest` -> iter_00000000), to be pruned."""
    return shutil.copytree(tiny_checkpoints / "mcore", tmp_path / "run")


def _pruning_reader(times: int):
    """A read that prunes the folder it was given (as the trainer would, just then) `times` times, then
    reads its common state; the folders it was called with are in `.calls`."""
    calls = []

    def read(folder: Path):
        calls.append(folder.name)
        if len(calls) <= times:
            prune_like_the_trainer(folder)
        return torch.load(folder / "common.pt", weights_only=False)

    read.calls = calls
    return read


def test_a_pruned_checkpoint_is_read_at_the_new_latest(run, caplog):
    read = _pruning_reader(1)
    with caplog.at_level(logging.WARNING, logger="sail_megatron.training.checkpoint_files"):
        assert read_checkpoint(run, read) is not None
    assert read.calls == [FIRST, SECOND]
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {run / FIRST} was pruned while being read: the training writing {run} has moved `latest` "
        f"on to {SECOND}; reading that one"
    ]


def test_a_run_pruning_faster_than_it_is_read_is_an_error(run):
    read = _pruning_reader(99)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(run, read)
    assert read.calls == ["iter_00000000", "iter_00000001", "iter_00000002"]
    message = str(error.value)
    assert message.startswith(f"checkpoint {run}: the training writing here replaced the checkpoint being read 3 ")
    assert "faster than they can be read" in message and "run.keep_last" in message


def test_an_iter_folder_pruned_while_read_names_the_run_folder(run):
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(run / FIRST, _pruning_reader(1))
    assert str(error.value).splitlines() == [
        f"checkpoint {run / FIRST}: was removed while being read: the training writing {run} prunes older "
        "checkpoints (run.keep_last)",
        f"Fix: pass the run folder {run} to read its newest checkpoint, or copy the checkpoint elsewhere and read "
        "the copy",
    ]


def test_damage_while_latest_stays_is_damage(run):
    calls = []

    def read(folder: Path):
        calls.append(folder.name)
        raise EOFError()

    with pytest.raises(CheckpointError, match=f"checkpoint {run / FIRST}: loading failed: EOFError"):
        read_checkpoint(run, read)
    assert calls == [FIRST]


def _pruning_cli(*commands, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m tests.helpers.pruning_run` with `commands` (each [TIMES, TOOL, ARGS...]) in a fresh process."""
    argv = [word for i, command in enumerate(commands) for word in ([] if i == 0 else ["+"]) + list(command)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "tests.helpers.pruning_run", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_convert_reads_a_run_pruned_under_it(tiny_checkpoints, tmp_path):
    """mcore-to-hf and verify on a trainer run folder whose checkpoint is pruned just before the weights
    are read: each says so in one line and converts / verifies the new one."""
    run = shutil.copytree(tiny_checkpoints / "run", tmp_path / "live")
    (old,) = [p.name for p in run.glob("iter_*")]
    new = f"iter_{int(old[5:]) + 1:08d}"
    newer = f"iter_{int(old[5:]) + 2:08d}"
    done = _pruning_cli(
        ["1", "sail-convert", "mcore-to-hf", "--ckpt", str(run), "--out", str(tmp_path / "hf")],
        ["1", "sail-convert", "verify", "--hf", str(tiny_checkpoints / "hf"), "--ckpt", str(run)],
        cwd=tmp_path,
    )
    assert done.stderr.count("pruning_run: exit 0") == 2, done.stderr[-4000:]
    for was, now in ((old, new), (new, newer)):
        assert (
            f"checkpoint {run / was} was pruned while being read: the training writing {run} has moved `latest` "
            f"on to {now}; reading that one" in done.stderr
        ), done.stderr[-4000:]
    assert "PASS: " in done.stdout, done.stdout
    assert (tmp_path / "hf" / "config.json").is_file() and (run / "latest").read_text().strip() == newer


def test_latest_moving_between_two_looks_is_followed(run, monkeypatch):
    """`latest` read just before the training moved it and pruned the folder it named: the folder is gone
    when looked for, and `latest`, read again, names the new one."""
    from sail_megatron.training import checkpoint_files

    shutil.copytree(run / FIRST, run / SECOND)
    shutil.rmtree(run / FIRST)  # `latest` still names it: what the reader saw a moment ago
    monkeypatch.setattr(checkpoint_files, "_pointer_name", lambda pointer: SECOND)  # what it reads now
    assert checkpoint_files.resolve_checkpoint_folder(run) == run / SECOND
