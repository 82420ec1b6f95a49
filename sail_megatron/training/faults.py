"""Injected faults for tests and drills (`run.inject_fault`, off by default): a rank hangs, is SIGKILLed
or exits at the start of a given step. Each fault fires once per run folder (a marker file records it),
so a job the launcher restarts from an earlier checkpoint runs through that step the second time."""

import logging
import os
import signal
import time
from pathlib import Path
from typing import Optional

from sail_megatron.config.train import parse_faults

logger = logging.getLogger(__name__)


class FaultInjector:
    def __init__(self, spec: Optional[str], rank: int, run_dir):
        self.rank = rank
        faults = parse_faults(spec) if spec else []
        self.faults = [(f, Path(run_dir) / f".fault-{f.kind}-at-{f.step}-rank-{f.rank}") for f in faults]

    def before_step(self, step: int) -> None:
        """Call at the start of every step (`step` counts from 1)."""
        for f, marker in self.faults:
            if step == f.step and self.rank == f.rank and not marker.exists():
                marker.write_text(f"{f.kind} injected on rank {self.rank} at step {step}, pid {os.getpid()}\n")
                self._inject(f.kind, step)

    def _inject(self, kind: str, step: int) -> None:
        logger.warning("injecting fault: %s on rank %d at step %d", kind, self.rank, step)
        for handler in logging.getLogger().handlers:
            handler.flush()
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "exit":
            os._exit(1)
        else:  # hang: as a rank stuck in a collective or a dead file system would
            while True:
                time.sleep(3600)
