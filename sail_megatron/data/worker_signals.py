"""Data-loader workers that outlive a job-wide SIGTERM long enough for the trainer to save.

torch's DataLoader workers install a C-level SIGTERM handler that exits quietly when the parent sends
it and dies on any other sender. SLURM (`scancel`, preemption, time limit) and torchrun signal whole
process groups, so the workers died first and the trainer crashed with "DataLoader worker killed"
in the middle of a collective instead of saving. Here a worker keeps torch's contract (its parent's
SIGTERM still ends it) and ignores everyone else's; the trainer decides when to stop and shuts its
workers down itself.
"""

import os
import signal
import threading

from torch.utils.data._utils import signal_handling

_installed = False


def _exit_on_parent_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)


def _shield_worker() -> None:
    # A Python-level no-op (not SIG_IGN: ignored signals are discarded and never reach sigwaitinfo).
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGUSR1, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)  # Ctrl-C reaches the whole group; the trainer saves first
    # Threads started from here on inherit the block; the waiter thread takes SIGTERM synchronously.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_parent_sigterm, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-parent").start()


def shield_loader_workers() -> None:
    """Call in the trainer before its loader forks workers (idempotent)."""
    global _installed
    if _installed:
        return
    torch_setup = signal_handling._set_worker_signal_handlers

    def setup_then_shield(*args, **kwargs):
        torch_setup(*args, **kwargs)
        _shield_worker()

    signal_handling._set_worker_signal_handlers = setup_then_shield
    _installed = True
