"""Stop on a signal at a step boundary: SIGTERM (SLURM preemption, `scancel`, torchrun shutting down),
SIGUSR1 (SLURM `--signal=USR1@120`, an early warning) and SIGINT (Ctrl-C) ask the run to save and exit
cleanly. A second Ctrl-C aborts at once, without saving (outside torchrun: torchrun turns it into SIGTERM).

The handler only sets a flag; the loop checks it after each step, and all ranks agree through one
tiny all-reduce, so every rank stops at the same step and the checkpoint is collective and whole.
"""

import logging
import os
import signal

from sail_megatron.data.worker_signals import shield_loader_workers
from sail_megatron.platform.process_lifetime import STOP_SIGNALS
from sail_megatron.training.collectives import any_rank

logger = logging.getLogger(__name__)


class GracefulStop:
    def __init__(self, signals=STOP_SIGNALS):
        self.received = None
        self._shield = shield_loader_workers()  # the loader's workers must not die of the same signal first
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def close(self) -> None:
        """Give the signals back to whoever had them (the loader's workers are gone by now)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        self._shield.close()

    def __enter__(self) -> "GracefulStop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.received == "SIGINT":
                raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
            if os.environ.get("RANK", "0") == "0":  # one line per job, not one per rank
                # Under torchrun a second Ctrl-C reaches torchrun, which passes it on as SIGTERM: it saves too.
                again = "" if "TORCHELASTIC_RUN_ID" in os.environ else " (Ctrl-C again aborts without saving)"
                print(f"interrupted: saving a checkpoint at the end of this step{again}", flush=True)
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank has received a stop signal."""
        return any_rank(self.received is not None)
