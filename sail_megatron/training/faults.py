"""Injected faults for tests and drills (`run.inject_fault`, off by default): a rank hangs, is SIGKILLed
or exits at the start of a given step. Each fault fires once per run folder (a marker file records it),
so a job the launcher restarts from an earlier checkpoint runs through that step the second time."""

import logging
import os
import signal
import time
from pathlib import Path
from typing import Optional

from sail_megatron.config.train import parse_fault

logger = logging.getLogger(__name__)


class FaultInjector:
    def __init__(self, spec: Optional[str], rank: int, run_dir):
        self.fault = parse_fault(spec) if spec else None
        self.rank = rank
        self.marker = Path(run_dir) / f".fault-{spec.replace('@', '-at-').replace(':', '-rank-')}" if spec else None

    def before_step(self, step: int) -> None:
        """Call at the start of every step (`step` counts from 1)."""
        f = self.fault
        if f is None or step != f.step or self.rank != f.rank or self.marker.exists():
            return
        self.marker.write_text(f"{f.kind} injected on rank {self.rank} at step {step}, pid {os.getpid()}\n")
        logger.warning("injecting fault: %s on rank %d at step %d", f.kind, self.rank, step)
        for handler in logging.getLogger().handlers:
            handler.flush()
        if f.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.kind == "exit":
            os._exit(1)
        else:  # hang: as a rank stuck in a collective or a dead file system would
            while True:
                time.sleep(3600)
