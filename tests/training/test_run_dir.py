"""The run folder's rules: one training at a time, resume from the newest complete checkpoint, prune
only a run's own older checkpoints, clear messages for failed saves."""

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sail_megatron.config import ConfigError
from sail_megatron.training import resume
from sail_megatron.training.resume import choose_start
from sail_megatron.training.run_dir import (
    KEEP_FILE,
    LATEST,
    RunLock,
    check_writable,
    checkpoints_to_prune,
    describe_save_failure,
)


def _checkpoints(save_dir, *iterations, latest=None):
    for it in iterations:
        (save_dir / f"iter_{it:08d}").mkdir(parents=True)
    if latest is not None:
        (save_dir / LATEST).write_text(f"iter_{latest:08d}\n")


@pytest.fixture
def files_pass(monkeypatch):
    """Empty iter folders count as good checkpoints here (their file checks are tested elsewhere)."""
    monkeypatch.setattr(resume, "check_checkpoint", lambda folder: folder)


def test_missing_pointer_resumes_from_the_newest_checkpoint(tmp_path, files_pass):
    _checkpoints(tmp_path, 2, 4)
    (tmp_path / "iter_00000006.tmp").mkdir()  # a write that never finished
    begin = choose_start(tmp_path)
    assert begin.resume.name == "iter_00000004" and "pointer is missing" in begin.pointer_note


def test_pointer_behind_a_complete_checkpoint(tmp_path, files_pass):
    _checkpoints(tmp_path, 2, 4, latest=2)  # killed between the rename and the pointer move
    begin = choose_start(tmp_path)
    assert begin.resume.name == "iter_00000004" and "names 'iter_00000002'" in begin.pointer_note


def test_empty_folder_starts_fresh(tmp_path):
    assert choose_start(tmp_path).resume is None
    assert choose_start(tmp_path / "absent").resume is None


def test_prune_keeps_newer_and_foreign_folders(tmp_path):
    _checkpoints(tmp_path, 2, 4, 6, 9)
    (tmp_path / "iter_00000001.replaced-20260101-000000").mkdir()
    newest = tmp_path / "iter_00000006"
    assert [p.name for p in checkpoints_to_prune(tmp_path, newest, keep_last=2)] == ["iter_00000002"]
    assert checkpoints_to_prune(tmp_path, newest, keep_last=3) == []
    assert [p.name for p in checkpoints_to_prune(tmp_path, newest, keep_last=1)] == ["iter_00000002", "iter_00000004"]


def test_checkpoints_kept_for_a_scaling_curve_are_never_pruned_nor_counted(tmp_path):
    _checkpoints(tmp_path, 1, 2, 3, 4, 5)
    for it in (2, 3):
        (tmp_path / f"iter_{it:08d}" / KEEP_FILE).write_text("run.save_at_tokens: reached 1K tokens\n")
    newest = tmp_path / "iter_00000005"
    assert [p.name for p in checkpoints_to_prune(tmp_path, newest, keep_last=2)] == ["iter_00000001"]
    assert [p.name for p in checkpoints_to_prune(tmp_path, newest, keep_last=1)] == ["iter_00000001", "iter_00000004"]


_HOLDER = textwrap.dedent("""
    import sys, time
    from sail_megatron.training.run_dir import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def test_second_training_is_refused_until_the_first_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as refused:
            RunLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in str(refused.value) and "run.save_dir" in str(refused.value)
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without cleaning up: the lock must not outlive it
        holder.wait()
    lock = RunLock(tmp_path).acquire()
    assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    lock.release()


def test_unwritable_save_dir_is_a_config_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="run.save_dir: cannot write"):
        check_writable(blocker / "run")


def test_disk_full_message_says_so_and_names_what_is_intact(tmp_path):
    _checkpoints(tmp_path, 2, latest=2)
    message = describe_save_failure(tmp_path, 4, OSError(errno.ENOSPC, "No space left on device"))
    assert "disk is full" in message and "iter_00000002" in message and "MiB free" in message
    assert "step-4" in message


def test_a_full_disk_at_start_is_named_and_leaves_no_probe(tmp_path):
    from tests.helpers.small_disk import fill, small_filesystem

    with small_filesystem(tmp_path / "disk", "256k") as disk:
        (disk / "run").mkdir()
        fill(disk)
        with pytest.raises(ConfigError, match="the disk is full") as found:
            check_writable(disk / "run")
        assert "MiB free" in str(found.value) and "can write to" not in str(found.value)
        assert list((disk / "run").iterdir()) == []
