"""Carry a saved data position over to another data-parallel size.

energon cuts the data into `data_parallel x num_workers` streams (stream g = rank x num_workers + worker
reads a fixed slice of the samples with its own seed), and a rank's saved loader state is one entry per
worker of that rank. When the product is the same before and after, stream g is the same slice with the
same seed whichever rank runs it, so restoring its saved entry continues it exactly. A resume at another
data-parallel size therefore picks `num_workers` to keep the product (`workers_to_continue`) and hands
each new rank the entries of its streams (`reshard_loader_state`).

What is exact: every stream continues where it stood, so every sample after the checkpoint is read once
and none before it again. What is not: the order in which streams interleave (a rank reads its workers in
turn), and the rows the tile balance had read ahead (`data/rank_balance.py`): they go to the new ranks
that took over their old rank's streams and run first, in their old order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from megatron.energon.savable_loader import SavableDataLoaderState

from sail_megatron.data.rank_balance import split_loader_state

__all__ = ["LoaderLayout", "workers_to_continue", "source_ranks", "reshard_loader_state"]


@dataclass(frozen=True)
class LoaderLayout:
    """How the loaders that saved (or will read) a data position were laid out."""

    data_parallel: int
    num_workers: int  # 0: the training process reads (one stream per rank, like one worker)

    @property
    def streams(self) -> int:
        return self.data_parallel * max(1, self.num_workers)

    def streams_of(self, rank: int) -> range:
        per_rank = max(1, self.num_workers)
        return range(rank * per_rank, (rank + 1) * per_rank)

    def rank_of(self, stream: int) -> int:
        return stream // max(1, self.num_workers)


def workers_to_continue(saved: LoaderLayout, data_parallel: int, configured_workers: int) -> Optional[int]:
    """The `num_workers` under which `data_parallel` ranks continue the saved streams exactly: the
    configured one when the layout is unchanged, else the one keeping data_parallel x num_workers.
    None when no count does (the product does not divide, or the saved ranks read without worker
    processes: their state is the training process's own and only continues on the same rank)."""
    if saved.data_parallel == data_parallel:
        return saved.num_workers
    if saved.num_workers == 0 or saved.streams % data_parallel:
        return None
    return saved.streams // data_parallel


def source_ranks(saved: LoaderLayout, now: LoaderLayout, rank: int) -> List[int]:
    """The saved ranks whose states `rank` needs under `now`: those that ran its streams. With the same
    number of streams before and after (the caller ensures it)."""
    return sorted({saved.rank_of(g) for g in now.streams_of(rank)})


def _leftover_rows(balance: Optional[Dict[str, Any]]) -> List[Any]:
    """Rows a saved rank had read from its loader but not yet trained on (its tile-balance state's)."""
    if balance is None:
        return []
    return list(balance["pending"]) + [row for _, row in balance["buffer"]]


def reshard_loader_state(saved_states: Dict[int, Any], saved: LoaderLayout, now: LoaderLayout, rank: int) -> Any:
    """This rank's loader state under `now`, from the saved ranks' states (`source_ranks`; keyed by
    saved data-parallel rank). `saved.streams == now.streams` is required."""
    if saved.streams != now.streams:
        raise ValueError(f"{saved} and {now} split the data into different numbers of streams")
    if saved == now:
        return saved_states[rank]
    parts = {d: split_loader_state(s) for d, s in saved_states.items()}  # d -> (energon, balance or None)
    energon = {d: e for d, (e, _) in parts.items()}
    mine = now.streams_of(rank)
    worker_states = []
    for g in mine:
        old = energon[saved.rank_of(g)]
        worker_states.append(old.worker_states[g - saved.streams_of(saved.rank_of(g)).start])
    # The stream the first saved rank would have read next, if it is one of ours: then we start there.
    first = min(energon)
    next_stream = saved.streams_of(first).start + energon[first].next_worker_id
    loader = SavableDataLoaderState(
        worker_states=worker_states,
        next_worker_id=next_stream - mine.start if next_stream in mine else 0,
        micro_batch_size=energon[first].micro_batch_size,
    )

    # Read-ahead rows of a saved rank go round-robin to the new ranks that took over its streams.
    rows = []
    for d in sorted(parts):
        takers = sorted({now.rank_of(g) for g in saved.streams_of(d)})
        rows += [row for i, row in enumerate(_leftover_rows(parts[d][1])) if takers[i % len(takers)] == rank]
    steps = [balance["step"] for _, balance in parts.values() if balance]
    if not rows and not steps:
        return loader
    return {
        "loader": loader,
        "balance": {
            "step": max(steps, default=0),
            "pulled": 0,
            "num_micro": None,  # another layout: the restored rows run first, new rows queue behind them
            "origin_q": 0,
            "origin_step": 0,
            "buffer": [(None, row) for row in rows],
            "pending": [],
        },
    }
