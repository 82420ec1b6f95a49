"""Where a run starts (`run.resume`): its own newest good checkpoint, else the previous stage's weights
(`run.init_from`), else random weights. Decided from the files alone, on every rank, before any process
group or model exists, so a run never trusts a damaged checkpoint and never starts over silently.

- A complete checkpoint (`iter_XXXXXXXX`, renamed into place once every rank's write finished) that fails
  its file checks (a missing or truncated shard, no metadata) is passed over, with the reason, for the
  next older one; if every checkpoint in the folder is damaged the run refuses to start.
- 'required' refuses to start without a checkpoint to continue; 'never' refuses a folder that holds one.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from sail_megatron.config import ConfigError
from sail_megatron.training.checkpoint_files import CheckpointError, check_checkpoint
from sail_megatron.training.run_dir import LATEST, complete_checkpoints


@dataclass(frozen=True)
class StartPoint:
    resume: Optional[Path]
    """The run's own checkpoint to continue from (model, optimizer, schedule, data position)."""
    init_from: Optional[str]
    """Otherwise the previous stage's checkpoint (weights only), when the recipe names one."""
    passed_over: Tuple[str, ...] = ()
    """Newer checkpoints found damaged, one line each: why they were not used."""
    pointer_note: Optional[str] = None
    """Set when `latest` does not name the checkpoint chosen."""


def _first_problem(error: CheckpointError) -> str:
    return error.problems[0] if len(error.problems) == 1 else f"{error.problems[0]} (+{len(error.problems) - 1} more)"


def choose_start(save_dir, mode: str = "auto", init_from: Optional[str] = None) -> StartPoint:
    """The start point of a run writing into `save_dir`. Raises ConfigError (run.resume) or
    CheckpointError (nothing usable where a checkpoint is needed)."""
    save_dir = Path(save_dir)
    checkpoints = complete_checkpoints(save_dir)
    if mode == "never" and checkpoints:
        raise ConfigError(
            "run.resume",
            f"is 'never' but {save_dir} already holds {len(checkpoints)} checkpoints (newest {checkpoints[-1].name})",
            "use a new run.save_dir, or run.resume=auto to continue that run",
        )
    passed_over, chosen = [], None
    for folder in reversed(checkpoints):
        try:
            chosen = check_checkpoint(folder)
            break
        except CheckpointError as e:
            passed_over.append(f"{folder.name}: {_first_problem(e)}")
    if checkpoints and chosen is None:
        raise CheckpointError(
            save_dir,
            passed_over,
            "every checkpoint here is damaged: copy a good one back, or start a new run.save_dir "
            "(run.init_from names the weights to start from)",
        )
    if chosen is None:
        if mode == "required":
            raise ConfigError(
                "run.resume",
                f"is 'required' but {save_dir} holds no checkpoint",
                "point run.save_dir at the run to continue, or use run.resume=auto",
            )
        if init_from:
            check_checkpoint(init_from)
        return StartPoint(None, init_from or None)
    pointer = save_dir / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    note = None
    if named != chosen.name:
        note = f"the '{LATEST}' pointer " + (f"names {named!r}" if named else "is missing")
    return StartPoint(chosen, None, tuple(passed_over), note)
