"""The run folder (`run.save_dir`): who owns it, and which of its checkpoints a restart resumes from.

Rules, so that no run ever loses another's work or its own:
- One training at a time per folder: the main rank holds an advisory lock (`.lock`, with pid, host and
  start time for the message) for the whole run. The operating system drops it when the process dies,
  however it dies, so a lock is never stale on a filesystem that supports locks; where locks are not
  supported, a lock file whose process is gone from this host is taken over.
- A restart resumes from the newest complete checkpoint (`iter_XXXXXXXX`, renamed into place only once
  every rank finished writing) that passes its file checks, also when the `latest` pointer is missing or
  lags behind it (training/resume.py decides).
- A folder whose checkpoints belong to another model is refused before anything is written.
"""

import dataclasses
import errno
import fcntl
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from sail_megatron.config import ConfigError
from sail_megatron.training.disk_errors import free_space, output_failure

logger = logging.getLogger(__name__)

LATEST = "latest"
LOCK = ".lock"
KEEP_FILE = "kept-for-good.txt"
"""In a checkpoint folder: why `keep_last` never prunes it (run.save_at_tokens)."""
_CHECKPOINT_NAME = re.compile(r"^iter_(\d{8})$")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:08d}"


def checkpoint_step(name: str) -> int:
    """The iteration of a checkpoint folder name (`iter_00000004` -> 4)."""
    found = _CHECKPOINT_NAME.match(name)
    if found is None:
        raise ValueError(f"{name!r} is not a checkpoint folder name")
    return int(found.group(1))


def complete_checkpoints(save_dir: Path) -> List[Path]:
    """`iter_XXXXXXXX` folders, oldest first (in-progress `.tmp` writes and other names excluded)."""
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if p.is_dir() and _CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_NAME.match(p.name).group(1)))


def checkpoints_to_prune(save_dir: Path, newest: Path, keep_last: int) -> List[Path]:
    """What `keep_last` removes after `newest` was written: only complete checkpoints older than it (a
    run resumes from the newest, so those are its own); never anything newer, in progress, renamed or
    kept for good (they do not count towards keep_last either)."""
    older = [p for p in complete_checkpoints(save_dir) if p.name < newest.name and not (p / KEEP_FILE).exists()]
    return older[: max(len(older) - (keep_last - 1), 0)]


def _differences(saved: Dict[str, Any], current: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for key in sorted(set(saved) & set(current)):
        a, b = saved[key], current[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b and key != "image_context_token_id":
            out.append(f"{prefix}{key} {a!r} there vs {b!r} here")
    return out


def another_model_error(
    field: str, checkpoint: Path, saved_model: Optional[Dict[str, Any]], model_config, fix: str
) -> ConfigError:
    """The error for a checkpoint whose tensors do not fit this model, naming the config fields that differ."""
    diffs = _differences(saved_model or {}, dataclasses.asdict(model_config))
    shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    return ConfigError(
        field, f"{checkpoint} holds a checkpoint of another model ({shown or 'its tensor shapes differ'})", fix
    )


def check_writable(save_dir: Path) -> None:
    """Create the run folder and prove it takes files, before any process group exists."""
    probe = save_dir / f".write-test-{os.getpid()}"
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConfigError(
                "run.save_dir",
                f"cannot write to {save_dir}: the disk is full ({free_space(save_dir)})",
                "free space there or choose a run.save_dir on another filesystem",
            ) from None
        raise ConfigError(
            "run.save_dir", f"cannot write to {save_dir}: {e.strerror or e}", "choose a folder this user can write to"
        ) from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # the folder itself could not be made
            pass


class RunLock:
    """The main rank's claim on a run folder for the life of the process (see the module docstring)."""

    def __init__(self, save_dir: Path):
        self.path = Path(save_dir) / LOCK
        self._file = None

    def acquire(self) -> "RunLock":
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise ConfigError(
                    "run.save_dir",
                    f"another training is using {self.path.parent} ({holder})",
                    "wait for it to finish, stop it, or use another run.save_dir",
                ) from None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._check_lock_file_without_flock(f)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def _check_lock_file_without_flock(self, f) -> None:
        """No advisory locks on this filesystem: trust the recorded pid when it is on this host."""
        f.seek(0)
        words = f.read().split()
        if len(words) >= 4 and words[0] == "pid":
            pid, host = int(words[1]), words[3]
            alive = host != socket.gethostname() or _pid_alive(pid)
            if alive and pid != os.getpid():
                f.close()
                raise ConfigError(
                    "run.save_dir",
                    f"another training may be using {self.path.parent} "
                    f"(pid {pid} on {host}; this filesystem has no locks to tell)",
                    f"if that run is gone, delete {self.path}",
                )

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock; the file stays as a record of the last owner
            self._file = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_save_failure(save_dir: Path, step: int, error: BaseException) -> str:
    """One message for a failed checkpoint write: what failed, how much room is left, what is intact."""
    room = free_space(save_dir)
    cause = output_failure(error, save_dir) or str(error).strip().splitlines()[0][:300]
    pointer = save_dir / LATEST
    kept = pointer.read_text().strip() if pointer.is_file() else "none"
    return (
        f"could not write the step-{step} checkpoint to {save_dir} ({room}): {cause}. The previous checkpoint "
        f"({kept}) and the '{LATEST}' pointer are intact; free space or move run.save_dir, then rerun to resume"
    )
