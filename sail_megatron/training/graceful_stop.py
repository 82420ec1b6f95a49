"""Stop on a signal at a step boundary: SIGTERM (SLURM preemption, `scancel`, torchrun shutting down)
and SIGUSR1 (SLURM `--signal=USR1@120`, an early warning) ask the run to save and exit cleanly.

The handler only sets a flag; the loop checks it after each step, and all ranks agree through one
tiny all-reduce, so every rank stops at the same step and the checkpoint is collective and whole.
"""

import logging
import signal

import torch
import torch.distributed as dist

from sail_megatron.data.worker_signals import shield_loader_workers
from sail_megatron.platform import read_dist_env

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
        flag = torch.tensor([1.0 if self.received else 0.0], device=read_dist_env().device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0
