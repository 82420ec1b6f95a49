"""Hang and straggler watch: a per-rank heartbeat that turns a stuck step into a restart.

Every rank beats once per step. A daemon thread checks the time since the last beat against the step
limit: `run.step_timeout_s`, and (after a few steps) `run.step_timeout_factor` times the median of the
recent steps, whichever is smaller. Past it, the rank writes every thread's Python stack
(`faulthandler`) to `RUN/hangs/rank_N.txt`, says so in the log, and exits with code 3, so torchrun
(with `--max-restarts`) restarts the job from the last checkpoint. A collective that hangs stops every
rank, so every rank dumps its stacks: together they show who waits on what. Ranks reach their limits a
little apart, and the launcher stops all of them once one exits, so a rank that fired waits (until every
rank's dump of this hang is there, or a grace of a fifth of the limit, 2-30 s) before it exits. The
watch starts with the first step (`arm`); the first steps are held only to `step_timeout_s`, checkpoint
saves likewise. The start-up before it (loading, rendezvous) is bounded by the process-group timeout of
its collectives.
"""

import contextlib
import faulthandler
import logging
import os
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

from sail_megatron.training.run_logs import HANGS_DIR

logger = logging.getLogger(__name__)

HANG_EXIT_CODE = 3
_WARMUP_STEPS = 5  # steps before the median-based limit applies
_WINDOW = 50  # recent steps the median is taken over
_GRACE_RANGE_S = (2.0, 30.0)  # bounds of the wait for the peers' dumps before exiting
_CLOCK_SLACK_S = 1.0  # file times on a shared file system may lag the writer's clock a little


def dump_grace_s(limit: float) -> float:
    """How long a rank that fired waits for its peers to dump their stacks too."""
    low, high = _GRACE_RANGE_S
    return min(high, max(low, limit / 5))


class StepWatchdog:
    def __init__(self, run_dir, rank: int, world_size: int, timeout_s: Optional[float], factor: float = 0.0):
        self.run_dir, self.rank, self.world_size = Path(run_dir), rank, world_size
        self.timeout_s, self.factor = timeout_s, factor
        self.recent: deque = deque(maxlen=_WINDOW)
        self.last_beat = time.monotonic()
        self.step = 0
        self.in_long_phase = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def arm(self) -> None:
        """Start watching: the first step begins now."""
        self.last_beat = time.monotonic()
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="sail-step-watchdog", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.timeout_s is not None or self.factor > 0

    def limit(self) -> Optional[float]:
        """Seconds the current step may take (None: no limit yet)."""
        limits = [self.timeout_s] if self.timeout_s is not None else []
        if self.factor > 0 and len(self.recent) >= _WARMUP_STEPS and not self.in_long_phase:
            limits.append(self.factor * statistics.median(self.recent))
        return min(limits) if limits else None

    def beat(self, step: int) -> None:
        """A step ended (call on every rank, every step)."""
        now = time.monotonic()
        self.recent.append(now - self.last_beat)
        self.last_beat, self.step = now, step

    @contextlib.contextmanager
    def long_phase(self):
        """Work between steps that is no step (a checkpoint save): held to step_timeout_s alone, and not
        counted as a step time."""
        self.in_long_phase = True
        try:
            yield
        finally:
            self.last_beat, self.in_long_phase = time.monotonic(), False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s()):
            limit = self.limit()
            waited = time.monotonic() - self.last_beat
            if limit is not None and waited > limit:
                self._fire(waited, limit)

    def _poll_s(self) -> float:
        limit = self.limit()
        return 1.0 if limit is None else max(0.05, min(1.0, limit / 20))

    def _fire(self, waited: float, limit: float) -> None:
        step_began = time.time() - waited
        folder = self.run_dir / HANGS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank_{self.rank}.txt"
        with open(path, "w") as f:
            f.write(
                f"rank {self.rank} pid {os.getpid()}: step {self.step + 1} has run {waited:.1f} s "
                f"(limit {limit:.1f} s); every thread's stack:\n\n"
            )
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        logger.error(
            "rank %d: step %d has run %.1f s, past its limit of %.1f s: stacks in %s; exiting with code %d "
            "so the launcher can restart from the last checkpoint",
            self.rank,
            self.step + 1,
            waited,
            limit,
            path,
            HANG_EXIT_CODE,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        self.wait_for_peer_dumps(step_began, dump_grace_s(limit))
        os._exit(HANG_EXIT_CODE)

    def wait_for_peer_dumps(self, step_began: float, grace_s: float) -> int:
        """Wait until every rank has dumped its stacks for this hang (files written after the hung step
        began; older ones are from an earlier hang), at most grace_s. Returns how many had."""
        deadline = time.monotonic() + grace_s
        while True:
            dumped = sum(
                1
                for path in (self.run_dir / HANGS_DIR).glob("rank_*.txt")
                if _mtime(path) >= step_began - _CLOCK_SLACK_S
            )
            if dumped >= self.world_size or time.monotonic() >= deadline:
                return dumped
            time.sleep(0.1)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # a peer replacing its dump
        return 0.0
