"""Paths a training run's config.yaml records, found from wherever a tool reading the run is started.

config.yaml records `data.tokenizer` as it was given, often relative (`demo_data/raw/tokenizer`): relative
to the folder the training was started from, which the run folder does not record. It can be recovered
when `run.save_dir` was relative too: the run folder is `<that folder>/<run.save_dir>`, so stripping
`run.save_dir` off the run folder's path gives it back.

A relative path is looked up, in this order, and the first that is there is used:
  1. the training's working folder (as above): what the path meant when the run read it;
  2. the current folder: the same place when the tool runs where the training ran, and the only guess left
     for a run started with an absolute run.save_dir;
  3. the run folder itself: a run folder copied elsewhere with the tokenizer beside its config.yaml.
None there: the caller keeps its clear error (pass --tokenizer), since any further guess could pick another
tokenizer of the same name, which would silently give wrong token ids.
"""

from pathlib import Path
from typing import List, Optional


def training_folder(run_folder: Path, save_dir: str) -> Optional[Path]:
    """The folder a training with `run.save_dir` = `save_dir` (as recorded) was started from, when the run
    folder's path ends with it; None when that cannot be told (an absolute or `..` save_dir, a moved run)."""
    recorded = Path(save_dir)
    if not save_dir or recorded.is_absolute() or ".." in recorded.parts or not recorded.parts:
        return None
    n = len(recorded.parts)
    for folder in (Path(run_folder).absolute(), Path(run_folder).resolve()):
        if len(folder.parts) > n and folder.parts[-n:] == recorded.parts:
            return Path(*folder.parts[:-n])
    return None


def recorded_path_candidates(recorded: str, run_folder: Path, save_dir: str) -> List[Path]:
    """Where a path recorded in the run's config.yaml may be, in the order of the module docstring."""
    path = Path(recorded)
    if path.is_absolute():
        return [path]
    started = training_folder(run_folder, save_dir)
    candidates = [started / path] if started is not None else []
    return candidates + [path, Path(run_folder) / path]


def find_recorded_folder(recorded: str, run_folder: Path, save_dir: str) -> Optional[Path]:
    """The folder a path recorded in the run's config.yaml names, from this working folder; None when it
    is in none of the places it may be (module docstring)."""
    for candidate in recorded_path_candidates(recorded, run_folder, save_dir):
        if candidate.is_dir():
            return candidate
    return None
