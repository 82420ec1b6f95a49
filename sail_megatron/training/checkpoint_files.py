"""Is a checkpoint folder complete and readable? Checked from file names, sizes and headers alone, before
megatron-core's dist_checkpointing reads it, so a damaged checkpoint is reported as such (naming the
folder and the file) instead of as whatever exception the first failed read happens to raise.

    check_checkpoint(path) -> the iter folder      (a checkpoint folder, or a run folder whose `latest` names one)
    read_checkpoint(path, read) -> read(folder)    (checked, read, and read again where a live run pruned it)
    with checkpoint_read_errors(folder): ...       (what still fails while loading, as a CheckpointError)

A torch_dist checkpoint folder holds `metadata.json` (the backend), `common.pt` (non-tensor state, a zip
written by torch.save), `.metadata` (where every tensor lives: file, offset, length) and the `*.distcp`
files it names. Each named file must exist and reach the end of the last byte range `.metadata` puts in it.

A run folder may be read while its training still writes into it. The trainer renames a finished
checkpoint into place, then moves `latest`, then prunes what `run.keep_last` no longer keeps, so a reader
that followed `latest` a moment earlier can find its folder half deleted. That is no damage: when a check
or read fails and `latest` has meanwhile moved on (or the folder is gone), the reader says so in one line
and reads the checkpoint `latest` names now (`read_checkpoint`).
"""

import json
import logging
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, TypeVar

from sail_megatron.training.run_dir import LATEST

METADATA_JSON = "metadata.json"
COMMON = "common.pt"
DCP_METADATA = ".metadata"
_POINTER = re.compile(r"iter_\d+")
_LISTED = 5  # at most this many bad files are named; the rest are counted
_FIX = "point `latest` at a complete iter_* folder (or pass that folder itself), or copy the checkpoint again"
READ_ATTEMPTS = 3
"""Reads of a run folder whose training prunes the checkpoint being read, before giving up."""

logger = logging.getLogger(__name__)
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: `folder` is the one at fault, `problems` one line each."""

    def __init__(self, folder, problems: Iterable[str], fix: Optional[str] = _FIX):
        self.folder = Path(folder)
        self.problems = list(problems)
        if len(self.problems) == 1:
            lines = [f"checkpoint {self.folder}: {self.problems[0]}"]
        else:
            lines = [f"checkpoint {self.folder}: {len(self.problems)} problems"]
            lines += [f"  - {p}" for p in self.problems]
        if fix:
            lines.append(f"Fix: {fix}")
        super().__init__("\n".join(lines))


def check_checkpoint(path) -> Path:
    """The iter folder that `path` names (itself, or what its `latest` names), after checking that every
    file a load reads is there and long enough. Raises CheckpointError otherwise. A run folder whose
    training prunes that folder meanwhile is checked again at its new `latest` (`read_checkpoint`)."""
    return read_checkpoint(path, lambda folder: folder)


def read_checkpoint(path, read: Callable[[Path], T], attempts: int = READ_ATTEMPTS) -> T:
    """`read(folder)` for the iter folder `path` names (itself, or what its `latest` names), after the file
    checks of `check_checkpoint`, with what loading raises reported as a CheckpointError naming the folder
    (`checkpoint_read_errors`). The one way every reader of a run folder reads a checkpoint.

    A failed check or read of a run folder whose `latest` has meanwhile moved on to another folder is the
    run's own pruning, not damage (module docstring): one line says so and the read starts again on the
    folder `latest` names now, up to `attempts` reads in all. A failure while `latest` stays put is damage
    and raised as such; so is an iter folder passed itself that is pruned, with the run folder to pass."""
    path = Path(path)
    folder = resolve_checkpoint_folder(path)
    for attempt in range(1, attempts + 1):
        try:
            problems = _file_problems(folder)
            if problems:
                raise CheckpointError(folder, _shortened(problems))
            with checkpoint_read_errors(folder):
                return read(folder)
        except CheckpointError as error:
            newer = _moved_on(path, folder)
            if newer is None:
                raise _pruned_itself(path, folder) or error
            if attempt == attempts:
                raise CheckpointError(
                    path,
                    [
                        f"the training writing here replaced the checkpoint being read {attempts} times in a row "
                        f"(last {folder.name}, now {newer.name}): it prunes older checkpoints "
                        "(run.keep_last) faster than they can be read"
                    ],
                    "read it once the training has stopped, or train with a larger run.keep_last so that a "
                    "checkpoint outlives its reading",
                ) from error
            what = f"{folder} was pruned while being read" if not folder.exists() else f"reading {folder} failed"
            logger.warning(
                "checkpoint %s: the training writing %s has moved `%s` on to %s; reading that one",
                what,
                path,
                LATEST,
                newer.name,
            )
            folder = newer
    raise AssertionError("unreachable")


def _moved_on(path: Path, folder: Path) -> Optional[Path]:
    """The folder `latest` in `path` names now, when it is another one than `folder`; else None."""
    if not (path / LATEST).is_file():
        return None
    try:
        now = resolve_checkpoint_folder(path)
    except CheckpointError:
        return None
    return now if now.name != folder.name else None


def _pruned_itself(path: Path, folder: Path) -> Optional[CheckpointError]:
    """The error for an iter folder passed itself that disappeared while it was read (its run pruned it)."""
    if path != folder or folder.exists():
        return None
    run = folder.parent
    where = f"the training writing {run} prunes older checkpoints (run.keep_last)" if (run / LATEST).is_file() else ""
    return CheckpointError(
        folder,
        [f"was removed while being read{': ' + where if where else ''}"],
        f"pass the run folder {run} to read its newest checkpoint, or copy the checkpoint elsewhere and read the copy",
    )


def resolve_checkpoint_folder(path) -> Path:
    """The iter folder `path` names, checked only for being there: the `latest` pointer must hold one line
    naming an iter_* folder inside `path`. Raises CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, ["does not exist"], "check the path")
    if not path.is_dir():
        raise CheckpointError(path, ["is a file, not a checkpoint folder"], "pass the run folder or an iter_* folder")
    pointer = path / LATEST
    if pointer.exists() or pointer.is_symlink():
        return _follow_pointer(path, pointer)
    if any((path / name).exists() for name in (METADATA_JSON, COMMON, DCP_METADATA)):
        return path
    iters = _iter_folders(path)
    if iters:
        raise CheckpointError(
            path,
            [f"has no `{LATEST}` pointer, only the folders {_names(iters)}"],
            f"pass the iter_* folder to use, or write its name into {pointer}",
        )
    raise CheckpointError(
        path,
        [f"holds no checkpoint (no `{LATEST}` pointer and no {METADATA_JSON}, {COMMON} or {DCP_METADATA})"],
        "pass a run folder or one of its iter_* folders",
    )


@contextmanager
def checkpoint_read_errors(folder) -> Iterator[None]:
    """Turns what megatron-core or torch raise when a checkpoint's files fail to load (missing or short
    files, unreadable pickles, a stored shape that does not fit) into a CheckpointError naming `folder`.
    Process-group failures are no checkpoint problem and pass through."""
    import pickle

    import torch.distributed as dist
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointError:
        raise
    except dist.DistError:
        raise
    except (
        CheckpointingException,
        CheckpointException,
        EOFError,
        OSError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        RuntimeError,
    ) as e:
        cause = _first_failure(e)
        raise CheckpointError(folder, [f"loading failed: {_describe(cause)}"], _read_fix(cause)) from e


def _first_failure(e: BaseException) -> BaseException:
    """torch's CheckpointException wraps each rank's exception (its own text is a traceback): unwrap."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = next(iter(failures.values()))
        if isinstance(wrapped, tuple) and wrapped and isinstance(wrapped[0], BaseException):
            return wrapped[0]
    return e


def _read_fix(e: BaseException) -> str:
    if "shape mismatch" in str(e):  # megatron's words for a checkpoint of another model
        return (
            "the checkpoint holds another model than the one being loaded: check the model config "
            "(for a run folder, its config.yaml) against the checkpoint"
        )
    return _FIX


def _describe(e: BaseException) -> str:
    """One line: the exception's type, the file it names and the first line of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, EOFError) and not text:
        text = "a file ended early (truncated)"
    filename = getattr(e, "filename", None)
    if filename and str(filename) not in text:
        text = f"{filename}: {text}" if text else str(filename)
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _follow_pointer(run: Path, pointer: Path) -> Path:
    fix = f"write the name of a complete iter_* folder into {pointer}, or pass that folder itself"
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(run, [f"`{LATEST}` is unreadable ({_describe(e)}){_choices(run)}"], fix) from e
    if not name:
        raise CheckpointError(run, [f"`{LATEST}` is empty{_choices(run)}"], fix)
    if not _POINTER.fullmatch(name):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise CheckpointError(
            run, [f"`{LATEST}` does not name an iter_* folder: it holds {shown!r}{_choices(run)}"], fix
        )
    folder = run / name
    if not folder.is_dir():
        moved = _pointer_name(pointer)
        if moved != name and moved is not None and _POINTER.fullmatch(moved) and (run / moved).is_dir():
            # A training moved `latest` and pruned the old folder between the two looks: its new one.
            return run / moved
        raise CheckpointError(run, [f"`{LATEST}` names {name}, which does not exist{_choices(run)}"], fix)
    return folder


def _pointer_name(pointer: Path) -> Optional[str]:
    try:
        return pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _iter_folders(run: Path) -> List[Path]:
    """Complete-looking iter_* folders (not the `.tmp` of an unfinished write), oldest first."""
    return sorted(p for p in run.glob("iter_*") if p.is_dir() and _POINTER.fullmatch(p.name))


def _names(folders: List[Path]) -> str:
    shown = ", ".join(p.name for p in folders[-_LISTED:])
    return shown if len(folders) <= _LISTED else f"{shown} (and {len(folders) - _LISTED} older)"


def _choices(run: Path) -> str:
    iters = _iter_folders(run)
    return f" (the folder holds {_names(iters)})" if iters else " (the folder holds no iter_* folder)"


def _file_problems(folder: Path) -> List[str]:
    """Every missing, short or unreadable file of the checkpoint folder, one line each."""
    if not any((folder / name).exists() for name in (METADATA_JSON, COMMON, DCP_METADATA)):
        return [f"holds no checkpoint files ({METADATA_JSON}, {COMMON}, {DCP_METADATA})"]
    problems: List[str] = []
    backend = _sharded_backend(folder, problems)
    common = folder / COMMON
    if not common.is_file():
        problems.append(f"{COMMON} is missing")
    elif not zipfile.is_zipfile(common):
        problems.append(f"{COMMON} is damaged ({common.stat().st_size} bytes, not a complete torch.save file)")
    if backend in (None, "torch_dist"):
        problems += _shard_problems(folder)
    return problems


def _sharded_backend(folder: Path, problems: List[str]) -> Optional[str]:
    path = folder / METADATA_JSON
    if not path.is_file():
        problems.append(f"{METADATA_JSON} is missing")
        return None
    try:
        backend = json.loads(path.read_text()).get("sharded_backend")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        problems.append(f"{METADATA_JSON} is unreadable ({_describe(e)})")
        return None
    return backend if isinstance(backend, str) else None


def _shard_problems(folder: Path) -> List[str]:
    """The files `.metadata` names: each there and at least as long as the data it must hold."""
    if not (folder / DCP_METADATA).is_file():
        return [f"{DCP_METADATA} is missing (it records where every tensor is stored)"]
    try:
        needed = _bytes_needed(folder)
    except Exception as e:  # whatever unpickling a damaged file raises
        return [f"{DCP_METADATA} is unreadable ({_describe(e)})"]
    problems = []
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing ({DCP_METADATA} stores {size} bytes of tensors in it)")
        elif path.stat().st_size < size:
            problems.append(f"{name} is truncated: {path.stat().st_size} bytes, {DCP_METADATA} needs {size}")
    return problems


def _bytes_needed(folder: Path) -> Dict[str, int]:
    """File name -> the end of the last byte range `.metadata` places in it."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata()
    needed: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    return needed


def _shortened(problems: List[str]) -> List[str]:
    """A hundred missing shards are one problem: name a few, count the rest."""
    if len(problems) <= _LISTED + 1:
        return problems
    return problems[:_LISTED] + [f"and {len(problems) - _LISTED} more files like these"]
