"""Injected faults for tests and drills (`run.inject_fault`, off by default): a rank hangs, is SIGKILLed
or exits at the start of a given step, or (step 0) during start-up, before the process group exists. Each fault fires once per run folder (a marker file records it),
so a job the launcher restarts from an earlier checkpoint runs through that step the second time."""

import logging
import os
import signal
import time
from pathlib import Path
from typing import Optional

from sail_megatron.config.train import parse_faults

logger = logging.getLogger(__name__)

STARTUP_DELAY_S = 3.0


class FaultInjector:
    def __init__(self, spec: Optional[str], rank: int, run_dir):
        self.rank = rank
        faults = parse_faults(spec) if spec else []
        self.faults = [(f, Path(run_dir) / f".fault-{f.kind}-at-{f.step}-rank-{f.rank}") for f in faults]

    def at_startup(self) -> None:
        """Call once, just before the process group is set up (faults at step 0). The fault fires after
        STARTUP_DELAY_S, when the other ranks already wait in the rendezvous: where a lost rank can hurt."""
        if any(f.step == 0 and f.rank == self.rank for f, _ in self.faults):
            time.sleep(STARTUP_DELAY_S)
        self.before_step(0)

    def before_step(self, step: int) -> None:
        """Call at the start of every step (`step` counts from 1)."""
        for f, marker in self.faults:
            if step == f.step and self.rank == f.rank and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)  # at start-up the run folder may not exist yet
                marker.write_text(f"{f.kind} injected on rank {self.rank} at step {step}, pid {os.getpid()}\n")
                self._inject(f.kind, step)

    def _inject(self, kind: str, step: int) -> None:
        where = f"at step {step}" if step else "during start-up"
        logger.warning("injecting fault: %s on rank %d %s", kind, self.rank, where)
        for handler in logging.getLogger().handlers:
            handler.flush()
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "exit":
            os._exit(1)
        else:  # hang: as a rank stuck in a collective or a dead file system would
            while True:
                time.sleep(3600)
