"""Where the data stream stands in a checkpoint, and how a resume continues it: exactly at the same
data-parallel size, and at another one stream by stream (data/loader_state.py)."""

import logging
from dataclasses import dataclass
from typing import Any, Dict

from megatron.core import parallel_state

from sail_megatron.data.loader_state import LoaderLayout, reshard_loader_state, source_ranks, workers_to_continue
from sail_megatron.training.checkpoint import load_data_states

logger = logging.getLogger(__name__)

COMMON_KEY = "data_position"
"""Key in a checkpoint's common state: how the loaders that saved it were laid out."""


def position_record(num_workers: int) -> Dict[str, Any]:
    return {"num_workers": num_workers}


@dataclass
class DataResume:
    num_workers: int
    """Loader workers per rank to read with (the configured count unless the saved streams need another)."""
    state: Any
    """This rank's loader state; None starts a new pass over the data."""


def resume_data(loaded: Dict[str, Any], configured_workers: int, is_main: bool) -> DataResume:
    """Collective (when the checkpoint holds data positions): this rank's part of the saved data position.
    `loaded` is what load_checkpoint returned."""
    record = loaded["common"].get(COMMON_KEY)
    if record is None:  # a checkpoint that kept loader states per rank, beside the RNG state
        return DataResume(configured_workers, (loaded["rank_state"] or {}).get("loader"))
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    saved = LoaderLayout(loaded["layout"]["data_parallel"], record["num_workers"])
    workers = workers_to_continue(saved, dp, configured_workers)
    samples = loaded["common"].get("consumed_samples", 0)
    if workers is None:
        if is_main:
            why = (
                "its ranks read without loader workers (data.num_workers 0), so their positions only continue on "
                "the same data-parallel size"
                if saved.num_workers == 0
                else f"its {saved.streams} loader streams (data-parallel {saved.data_parallel} x "
                f"{saved.num_workers} workers) do not divide among {dp} ranks"
            )
            logger.warning(
                "the data position of %s cannot be carried over: %s. The loader starts a new pass over the data, "
                "so some of the %d samples read before will be seen again",
                loaded["path"],
                why,
                samples,
            )
        return DataResume(configured_workers, None)
    now = LoaderLayout(dp, workers)
    # Each saved rank's state is counted by the first new rank that takes over one of its streams.
    sources = {d: now.rank_of(saved.streams_of(d).start) == rank for d in source_ranks(saved, now, rank)}
    states = load_data_states(loaded["path"], saved.data_parallel, sources)
    if is_main and workers != configured_workers:
        logger.warning(
            "data.num_workers %d -> %d: the checkpoint's %d loader streams continue exactly only as "
            "%d ranks x %d workers",
            configured_workers,
            workers,
            saved.streams,
            dp,
            workers,
        )
    if is_main and saved != now:
        logger.warning(
            "data position carried from data-parallel size %d to %d: each of the %d loader streams continues "
            "where it stood (no sample after the checkpoint is skipped or read twice); not exact: the order "
            "in which streams interleave, and the rows read ahead for tile balancing run first on the ranks "
            "that took over their streams",
            saved.data_parallel,
            dp,
            saved.streams,
        )
    return DataResume(workers, reshard_loader_state(states, saved, now, rank))
