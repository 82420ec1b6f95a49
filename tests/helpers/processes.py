"""Process-tree helpers for tests that launch torchrun and kill it the hard way."""

import os
import signal
import time
from pathlib import Path
from typing import Callable, List


def descendants(pid: int) -> List[int]:
    """pid's children, grandchildren, ... (torchrun starts each rank in its own session, so killing
    torchrun's process group does not reach them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal pid and every descendant at once, as a node failure (SIGKILL) would."""
    for p in [pid] + descendants(pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def wait_for(condition: Callable[[], bool], timeout: float, poll: float = 0.005, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)
