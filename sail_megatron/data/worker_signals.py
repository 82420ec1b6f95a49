"""Data-loader workers that outlive a job-wide SIGTERM long enough for the trainer to save, and never
outlive the trainer itself.

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

from sail_megatron.platform.process_lifetime import STOP_SIGNALS, die_with_parent


def _exit_on_parent_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)


def _shield_worker() -> None:
    # A Python-level no-op (not SIG_IGN: ignored signals are discarded and never reach sigwaitinfo). The
    # stop signals reach the whole process group (Ctrl-C too); the trainer saves first.
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: None)
    # Threads started from here on inherit the block; the waiter thread takes SIGTERM synchronously.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()
    die_with_parent(parent)  # an orphaned worker would hold the job's pipes open; its queue could block
    threading.Thread(target=_exit_on_parent_sigterm, args=(parent,), daemon=True, name="sigterm-from-parent").start()


class shield_loader_workers:
    """While active, DataLoader workers forked by this process keep the parent-only SIGTERM contract
    above (use it as a context manager, or call `close()`); nested uses share one hook."""

    _depth = 0
    _original = None

    def __init__(self):
        cls = shield_loader_workers
        if cls._depth == 0:
            torch_setup = cls._original = signal_handling._set_worker_signal_handlers

            def setup_then_shield(*args, **kwargs):
                torch_setup(*args, **kwargs)
                _shield_worker()

            signal_handling._set_worker_signal_handlers = setup_then_shield
        cls._depth += 1
        self._open = True

    def close(self) -> None:
        cls = shield_loader_workers
        if self._open:
            self._open = False
            cls._depth -= 1
            if cls._depth == 0:
                signal_handling._set_worker_signal_handlers = cls._original

    def __enter__(self) -> "shield_loader_workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
