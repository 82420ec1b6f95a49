"""Loading a checkpoint written with one layer backend into a model built with the other.

Transformer Engine's standalone norms (the language model's final norm, AIMv2's patch and final norms,
Qwen3's q/k norms) keep an `_extra_state` in their state dict, which megatron-core saves as one more
object per norm; megatron-core's local norms keep none. So a checkpoint written with local layers (on
a CPU box, by `sail-convert`) lacks objects a TE model asks for, and one written with TE layers holds
objects a local model never asks for. Both are what the backends differ by and carry no weights (TE's
standalone norms hold no FP8 state), so they may be absent; anything else absent stays an error that
names it. (Megatron-LM itself falls back to a non-strict load for TE's extra states.)
"""

import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from sail_megatron.config.errors import first_and_count
from sail_megatron.training.checkpoint_files import CheckpointError

logger = logging.getLogger(__name__)

EXTRA_STATE = "_extra_state"
"""torch's name for a module's extra state (`get_extra_state`), the last part of its checkpoint key."""

_SHOWN = 8  # absent names listed in an error; the rest are counted


def is_backend_extra_state(key: str) -> bool:
    """A state-dict or checkpoint key of a module's extra state (`a.b._extra_state`, or megatron's
    sharded form `a.b._extra_state/shard_0_1`)."""
    return key.split("/", 1)[0].rsplit(".", 1)[-1] == EXTRA_STATE


def _names(keys: Iterable[str]) -> List[str]:
    return first_and_count(sorted(keys), _SHOWN)


def load_sharded(sharded_state: Dict[str, Any], directory: Path) -> Dict[str, Any]:
    """dist_checkpointing.load of `sharded_state` from `directory`; objects the checkpoint lacks are
    dropped from the request when they are extra states, an error naming them otherwise."""
    state, _, absent = dist_checkpointing.load(sharded_state, str(directory), strict=StrictHandling.RETURN_UNEXPECTED)
    weights = [k for k in absent if not is_backend_extra_state(k)]
    if weights:
        raise CheckpointError(
            directory,
            [f"has no {name}" for name in _names(weights)],
            "the checkpoint is of another model (or incomplete): point at a checkpoint of this model",
        )
    if absent:
        logger.info(
            "%s: %d module extra states absent (written with the other layer backend); those modules keep their own",
            directory,
            len(absent),
        )
    return state


def apply_model_state(module: torch.nn.Module, state_dict: Dict[str, Any], directory: Path) -> None:
    """module.load_state_dict(state_dict), where only extra states may be missing."""
    result = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not is_backend_extra_state(k)]
    problems = [f"has no {k}" for k in _names(missing)]
    problems += [f"holds {k}, which this model does not have" for k in _names(result.unexpected_keys)]
    if problems:
        raise CheckpointError(directory, problems, "point at a checkpoint of this model")
