"""A run's logs in its folder belong to one run.

A run that starts fresh (no checkpoint of its own to resume) in a folder that holds an earlier run's logs
sets those aside, whole, into `RUN/earlier-runs/N/` before it writes anything, and says so: appending to
them would mix two runs in one metrics.jsonl, one TensorBoard log and one curves.png. A resumed run
continues its own logs and marks the resume in metrics.jsonl, so the curves drop the steps it runs again.
"""

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

# The names of what a run writes about itself in its folder (its checkpoints aside), in one place.
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"
HANGS_DIR = "hangs"
RUN_LOGS = (CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR, CURVES_FILE, HANGS_DIR)
EARLIER_RUNS = "earlier-runs"
RESUME_EVENT = "resume"
"""A metrics.jsonl record {"event": "resume", "step": N}: the run resumed from its step-N checkpoint, so
the records of later steps written before it belong to steps it runs again."""


def set_aside_earlier_logs(save_dir: Path) -> Optional[Path]:
    """Move an earlier run's logs out of `save_dir` into a new `earlier-runs/N/`; returns it (None when
    there were none). Main rank, before the run writes its own."""
    present = [name for name in RUN_LOGS if (save_dir / name).exists()]
    if not present:
        return None
    n = 1
    while (save_dir / EARLIER_RUNS / str(n)).exists():
        n += 1
    dest = save_dir / EARLIER_RUNS / str(n)
    dest.mkdir(parents=True)
    for name in present:
        os.replace(save_dir / name, dest / name)
    logger.warning(
        "%s holds an earlier run's logs and no checkpoint to resume: this run starts fresh, and those logs "
        "(%s) are moved to %s",
        save_dir,
        ", ".join(present),
        dest,
    )
    return dest


def mark_resume(save_dir: Path, step: int, checkpoint: str) -> None:
    """Append the resume marker to metrics.jsonl: records of later steps before it are superseded."""
    record = {
        "event": RESUME_EVENT,
        "step": step,
        "checkpoint": checkpoint,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(save_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
