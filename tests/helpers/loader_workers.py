"""Data-loader workers stop with the test that made them.

A loader left to the garbage collector keeps its workers filling their buffers, taking the CPU from the
tests after it, and its eventual shutdown holds up whichever test triggers the collection for torch's
5 s join per busy worker. Torch offers no way to stop workers at once, so the loader iterators made
during a test are tracked here and their workers terminated when it ends (tests only).
"""

import weakref

from torch.utils.data import _utils
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

_live: "weakref.WeakSet[_MultiProcessingDataLoaderIter]" = weakref.WeakSet()


def track_loader_iterators() -> None:
    original = _MultiProcessingDataLoaderIter.__init__

    def init(self, *args, **kwargs):
        _live.add(self)  # first: a constructor that fails part-way may have started workers already
        original(self, *args, **kwargs)

    _MultiProcessingDataLoaderIter.__init__ = init


def stop_loader_workers() -> None:
    for it in list(_live):
        if getattr(it, "_shutdown", True):
            continue
        if hasattr(it, "_pin_memory_thread"):  # first, as torch does: it reads what the workers write
            it._pin_memory_thread_done_event.set()
            it._worker_result_queue.put((None, None))
            it._pin_memory_thread.join()
        if getattr(it, "_worker_pids_set", False):  # or torch's SIGCHLD handler reports the kill as a crash
            _utils.signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
        for worker in getattr(it, "_workers", []):
            if worker.is_alive():
                worker.terminate()
            worker.join()
        it._shutdown_workers()  # closes the queues; nothing left to wait for
    _live.clear()
