"""Was a failed write the fault of the filesystem it wrote to (full, over quota, read-only)? One answer for
every tool that writes large files (checkpoints, conversions), so each can end with one message naming the
folder and its free space instead of a traceback.

What reaches the caller is rarely a plain OSError: torch's distributed checkpoint writer wraps each
rank's exception in a `CheckpointException` (which derives from BaseException, so `except Exception`
misses it), megatron-core's background writer re-raises it as `RuntimeError("Worker failure: [Errno 28]
...")`, and torch's zip writer reports a short write as "unexpected pos 704 vs 598". `output_failure`
looks through all of those.

    try: ... except write_errors() as e: problem = output_failure(e, out_folder)   (None: not the disk's fault)
"""

import errno
import shutil
from pathlib import Path
from typing import Iterator, Optional, Tuple

NEARLY_FULL_BYTES = 64 << 20
"""Less free space than this after a short write means the disk was full."""
_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file grew past the filesystem's largest file size",
    errno.EROFS: "the filesystem is read-only",
}
# The same errors where only their text survived (a worker's exception turned into a message).
_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "[Errno 28]": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "[Errno 122]": errno.EDQUOT,
    "File too large": errno.EFBIG,
    "Read-only file system": errno.EROFS,
}
_SHORT_WRITE = "unexpected pos"  # torch's inline_container writer, when the disk took fewer bytes than given


def write_errors() -> Tuple[type, ...]:
    """What a failed write can raise: any Exception, and torch's CheckpointException (a BaseException).
    KeyboardInterrupt and SystemExit stay out."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def _free_bytes(path) -> Optional[int]:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent); None if unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def free_space(path) -> str:
    """'1.9 MiB free on its filesystem' for the filesystem holding `path` (or its nearest existing parent)."""
    free = _free_bytes(path)
    if free is None:
        return "free space unknown"
    mib = free / 2**20
    shown = f"{mib:,.1f}" if mib < 10 else f"{mib:,.0f}"
    return f"{shown} MiB free on its filesystem"


def output_failure(error: BaseException, path) -> Optional[str]:
    """Why writing under `path` failed, when the filesystem is at fault ('the disk is full', ...); None for
    any other failure. A short write counts as a full disk when `path`'s filesystem is nearly full now
    (call it before removing the partial output)."""
    short_write = False
    for cause in _causes(error):
        code = getattr(cause, "errno", None)
        if code in _ERRNOS:
            return _ERRNOS[code]
        text = str(cause)
        for needle, code in _TEXTS.items():
            if needle in text:
                return _ERRNOS[code]
        short_write = short_write or _SHORT_WRITE in text
    if short_write and _nearly_full(path):
        return _ERRNOS[errno.ENOSPC]
    return None


def _causes(error: BaseException, limit: int = 20) -> Iterator[BaseException]:
    """`error`, the per-rank exceptions a CheckpointException carries, and their causes and contexts."""
    seen, todo = set(), [error]
    while todo and len(seen) < limit:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                todo.append(failure[0] if isinstance(failure, tuple) and failure else failure)
        todo += [c for c in (e.__cause__, e.__context__) if isinstance(c, BaseException)]


def _nearly_full(path) -> bool:
    free = _free_bytes(path)
    return free is not None and free < NEARLY_FULL_BYTES
