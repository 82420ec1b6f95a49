"""Opening what the data tools read, so that no input can block them or flood their memory.

Every file a `sail-data` command reads (records files, images, blend YAMLs, the files of prepared parts and of
tokenizer folders) goes through here:

- its kind is checked before it is opened (a `stat`, so a device is never opened at all) and again with
  `fstat` on the opened descriptor (so nothing can be swapped in between). Only regular files are read: a
  folder, a FIFO (named pipe), a character or block device (`/dev/zero`) or a socket is `NotRegularFile`,
  whose message names the kind;
- it is opened with O_NONBLOCK, so opening a FIFO returns at once instead of waiting for a writer;
- reads are bounded: `read_regular` never reads more than its `limit` and raises `FileTooLarge` for a larger
  file, whatever the file system claims its size is.

Folders that are expected to be folders are checked with `check_folder`, and `check_files_in` checks the files
of a folder that other code (energon, transformers) will open by itself.
"""

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Optional, Union

PathLike = Union[str, Path]

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISREG, "a regular file"),
)


def kind_of(mode: int) -> str:
    """'a folder', 'a FIFO (named pipe)', 'a character device', ... for an `st_mode`."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class NotRegularFile(OSError):
    """A path that was to be read as a file is something else; `kind` says what (see `kind_of`)."""

    def __init__(self, path: PathLike, kind: str, what: str = ""):
        self.path, self.kind = Path(path), kind
        label = f"{what} {path}" if what else str(path)
        super().__init__(f"{label} is {kind}, not a regular file")


class NotAFolder(OSError):
    """A path that was to be a folder is something else (`kind`), or nothing (`kind` None)."""

    def __init__(self, path: PathLike, kind: Optional[str], what: str = ""):
        self.path, self.kind = Path(path), kind
        label = f"{what} {path}" if what else str(path)
        super().__init__(f"{label} does not exist" if kind is None else f"{label} is {kind}, not a folder")


class FileTooLarge(OSError):
    """A file over the size limit of what reads it; nothing past the limit was read."""

    def __init__(self, path: PathLike, size: Optional[int], limit: int, what: str = ""):
        self.path, self.size, self.limit = Path(path), size, limit
        label = f"{what} {path}" if what else str(path)
        held = f"more than {limit} bytes" if size is None else f"{size} bytes"
        super().__init__(f"{label} holds {held}, over the limit of {limit} bytes")


def _refuse_non_regular(mode: int, path: PathLike, what: str) -> None:
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path, kind_of(mode), what)


def open_regular(path: PathLike, what: str = "") -> BinaryIO:
    """`path` opened for binary reading, if it is a regular file (symbolic links followed).

    what: how messages name the path (e.g. '--input'). Raises `NotRegularFile`, or the OSError of the
    open (FileNotFoundError, PermissionError, ELOOP ...)."""
    _refuse_non_regular(os.stat(path).st_mode, path, what)  # never open a device: opening some has effects
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket put in its place meanwhile
            raise NotRegularFile(path, "a socket", what) from None
        raise
    try:
        _refuse_non_regular(os.fstat(fd).st_mode, path, what)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: PathLike, what: str = "") -> None:
    """Raise unless `path` is a regular file this process can open (for files other code opens)."""
    open_regular(path, what).close()


def read_regular(path: PathLike, limit: int, what: str = "") -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them: a larger file is `FileTooLarge`."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FileTooLarge(path, size, limit, what)
        data = f.read(limit + 1)  # the size can lie (a growing file, /proc): the read bound holds anyway
    if len(data) > limit:
        raise FileTooLarge(path, None, limit, what)
    return data


def check_folder(path: PathLike, what: str = "") -> None:
    """Raise `NotAFolder` unless `path` is a folder (symbolic links followed)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NotAFolder(path, None, what) from None
    if not stat.S_ISDIR(mode):
        raise NotAFolder(path, kind_of(mode), what)


def check_files_in(folder: PathLike, what: str = "") -> None:
    """Every entry of `folder` (not recursive) is a folder or a regular file: run it before handing the
    folder to code that opens its files itself. Broken symbolic links are left to that code."""
    for entry in os.scandir(folder):
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise NotRegularFile(entry.path, kind_of(mode), what)
