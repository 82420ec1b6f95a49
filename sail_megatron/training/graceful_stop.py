"""Stop on a signal at a step boundary: SIGTERM (SLURM preemption, `scancel`, torchrun shutting down)
and SIGUSR1 (SLURM `--signal=USR1@120`, an early warning) ask the run to save and exit cleanly.

The handler only sets a flag; the loop checks it after each step, and all ranks agree through one
tiny all-reduce, so every rank stops at the same step and the checkpoint is collective and whole.
"""

import logging
import signal

from sail_megatron.data.worker_signals import shield_loader_workers
from sail_megatron.training.collectives import any_rank

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class GracefulStop:
    def __init__(self, signals=STOP_SIGNALS):
        self.received = None
        shield_loader_workers()  # the loader's workers must not die of the same signal first
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank has received a stop signal."""
        return any_rank(self.received is not None)
