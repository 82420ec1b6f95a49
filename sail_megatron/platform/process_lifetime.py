"""Helper processes that never outlive the process that started them.

A rank can die at any moment (SIGKILL, the hang watchdog's exit). Its children (data-loader workers,
megatron's checkpoint-writer results manager) would otherwise live on as orphans: they hold the job's
output pipes open, so a launcher or a test waiting for EOF never gets it, and each restart leaves more.
"""

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

# The signals that ask a run to save and stop (SLURM, torchrun, Ctrl-C). They reach a rank's whole
# process group, helpers included; the trainer acts on them, and stops its helpers itself.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, however it dies. Call it first thing
    in the child with the parent's pid. Linux only; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)


def serve_until_parent_stops(parent: int) -> None:
    """For a helper server the trainer needs while it saves on a stop signal (megatron's checkpoint-results
    server): ignore the stop signals, and die with `parent`. Call it first thing in the child."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent)


def rank_dies_with_launcher() -> None:
    """Under torchrun: SIGKILL this rank when its launcher dies (kill -9, the OOM killer). torch starts ranks
    in sessions of their own, so neither the launcher's death nor a kill of its process group reaches them,
    and orphaned ranks would go on training and writing checkpoints into the run folder. A rank's helpers
    die with the rank in turn. Call first thing in the rank."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(os.getppid())
