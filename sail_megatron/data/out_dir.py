"""Output folders that are never half-written and never delete what they should not.

A command writes into a hidden sibling folder and renames it into place only when everything succeeded,
so a failed or interrupted run leaves `--out` as it was. `--overwrite` replaces a folder only if it is
recognisably an earlier output of the same command (its layout says so) and only after the new one is
complete. An `--out` that is, holds or lies inside an input is refused before anything is written.

Stop signals (Ctrl-C, SIGTERM, SIGHUP, SLURM's SIGUSR1): under `stop_on_signals` the first one raises
`Interrupted` in the main thread, so the command unwinds through these same cleanups at once, whatever it was
waiting for; the cleanups themselves (removing the staging folder, swapping the new folder in) are never cut
short by a signal: one that arrives meanwhile is raised when they are done.
"""

import fnmatch
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

# The trainer's stop signals (platform/process_lifetime.STOP_SIGNALS: SLURM, torchrun, Ctrl-C) and a closed
# terminal's SIGHUP. Not imported from there: importing platform/ loads megatron-core, seconds that every
# sail-data command would spend for nothing.
_DATA_TOOL_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


class OutputError(ValueError):
    """`--out` cannot be used; the message names the path and the fix."""


class Interrupted(BaseException):
    """A stop signal arrived (see `stop_on_signals`). A BaseException, like KeyboardInterrupt: code that
    handles errors (`except Exception`) must not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")


class _Stop:
    shield_depth = 0  # > 0 while a cleanup runs: signals wait for its end
    pending: Optional[int] = None  # a signal that arrived during a cleanup
    raised = False  # Interrupted was raised once: the command is unwinding, later signals change nothing


def _on_stop_signal(signum: int, frame) -> None:
    if _Stop.raised:
        return
    if _Stop.shield_depth > 0:
        _Stop.pending = _Stop.pending or signum
        return
    _Stop.raised = True
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While active, a stop signal raises `Interrupted` in the main thread (call it from the main thread).
    The previous handlers come back at the end."""
    _Stop.shield_depth, _Stop.pending, _Stop.raised = 0, None, False
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in _DATA_TOOL_STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _shielded() -> Iterator[None]:
    """A cleanup step that a stop signal must not cut short: the signal is raised when the step is done."""
    _Stop.shield_depth += 1
    try:
        yield
    finally:
        _Stop.shield_depth -= 1
        if _Stop.shield_depth == 0 and _Stop.pending is not None and not _Stop.raised:
            signum, _Stop.pending, _Stop.raised = _Stop.pending, None, True
            raise Interrupted(signum)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))  # symlinks resolved, also for paths that do not exist yet


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_separate(
    out: Path, input_files: Sequence[Path] = (), input_dirs: Sequence[Path] = (), flag: str = "--out"
) -> None:
    """Refuse an `out` that could hold an input: equal to, inside or around an input folder, or around an
    input file (a folder next to an input file is fine: deleting it cannot touch the file)."""
    real_out = _real(out)
    for d in input_dirs:
        real = _real(d)
        if _inside(real_out, real) or _inside(real, real_out):
            where = "is" if real_out == real else "is inside" if _inside(real_out, real) else "contains"
            raise OutputError(
                f"{flag} {out} {where} the input folder {d}; replacing it could delete the "
                f"inputs: choose an {flag} outside {d}"
            )
    for f in input_files:
        if _inside(_real(f), real_out):
            raise OutputError(
                f"{flag} {out} contains the input file {f}; replacing it would delete the "
                f"input: choose an {flag} that does not hold {f}"
            )


def layout_matches(folder: Path, patterns: Sequence[str]) -> bool:
    """Every entry of `folder` matches one of `patterns` (fnmatch, hidden names included)."""
    return all(any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns) for p in folder.iterdir())


def _blocking_ancestor(path: Path) -> Optional[str]:
    """Why `path`'s folder cannot be created, or None."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"no permission to write in {parent}"
            return None
        if parent.is_symlink():
            return f"{parent} is a broken symbolic link"
    return None


def check_out(out: Path, overwrite: bool, is_ours: Callable[[Path], bool], what: str, flag: str = "--out") -> None:
    """Every check on `out` that can fail before any work: wrong kind, not replaceable, not creatable."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"{flag} {out} exists and is not a folder; choose a folder path")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
            if not is_ours(out):
                raise OutputError(
                    f"{out} is not empty and is not {what}, so --overwrite will not delete it; "
                    "empty or remove it yourself, or choose another folder"
                )
        parent = _real(out).parent  # the new folder is staged next to the real one
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"cannot replace {out}: no permission to write in {parent}")
        return
    problem = _blocking_ancestor(out)
    if problem is not None:
        raise OutputError(f"cannot create {flag} {out}: {problem}")


def _missing_parents(path: Path) -> List[Path]:
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of `out` to write into; on success it replaces `out` (after
    `check_out` allowed that), on any failure it is removed and `out` stays as it was."""
    out = _real(out)  # stage on the filesystem the output lands on, so the final rename is atomic
    created = _missing_parents(out)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:  # from the first folder made: a signal at any point leaves nothing behind
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove(stage)  # left by an earlier process with the same pid
        stage.mkdir()
        yield stage
        with _shielded():
            _swap_in(stage, out)
    except BaseException:
        with _shielded():
            _remove(stage)
            for parent in created:  # innermost first; only folders this call made, and only if still empty
                try:
                    parent.rmdir()
                except OSError:
                    break
        raise


def _swap_in(stage: Path, out: Path) -> None:
    """Replace `out` by `stage`: the old folder is moved aside first and deleted only once the new one is in."""
    old: Optional[Path] = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        _remove(old)
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        _remove(old)
