"""Balance one training step's vision work across data-parallel ranks without moving any rows.

Each data-parallel rank packs its own rows (`plan_packs`), so rows within a rank carry even tile
counts, but the tiles of one step (the sum over its `num_micro` micro-batches) still differ from rank
to rank, and the rank with the most tiles sets the step time. Here each rank keeps a look-ahead buffer
of `num_micro + lookahead` ready rows (still undecoded) and, every step, takes the `num_micro` rows
whose tile sum is closest to a target all ranks agree on. Rows not taken stay buffered for later
steps; nothing is decoded twice and no image leaves its rank.

Deadlines (no starvation). Row q of a rank's stream (0, 1, 2, ...) would run at step q // num_micro
without balancing; it must run by step q // num_micro + max_delay. At each step the rows whose
deadline has come are taken first. At most num_micro rows fall due per step (those of one step's
worth of the stream), so the rule can always be met: no row runs more than `max_delay` steps later
than it would have, none is dropped or repeated, and taken rows keep their stream order in the step.

One step, per rank (`step_options`): forced = the rows due now; the other rows fill the remaining
slots. A dynamic program over (rows, how many taken) holds, as Python-int bitmasks, every tile sum a
choice can reach: O(buffer x num_micro) shifts of (num_micro x max tiles)-bit integers, well under a
millisecond for 4 micro-batches and a buffer of 12. The ranks then all-gather a small summary
(`summarize`: tiles and rows buffered, the reachable sums as a bitmask) and every rank computes the
same target (`choose_target`) from it: for each candidate target T each rank would reach its
reachable sum nearest T, and T is chosen to minimise that step's idle vision work (max - mean over
ranks), ties broken towards num_micro x the mean tiles per buffered row over all ranks (so the
buffers do not drift) and then the smaller T. Finally each rank takes a subset reaching its nearest
sum (`StepOptions.take`), preferring its oldest rows among equal sums. All of it is a deterministic
function of the gathered summaries and the rank's own buffer, so the tensor- and pipeline-parallel
peers of a data-parallel rank, which hold identical buffers, choose identically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "StepOptions",
    "step_options",
    "summarize",
    "choose_target",
    "plan_step",
    "RankBalancedLoader",
    "balanced_loader",
    "split_loader_state",
]

logger = logging.getLogger(__name__)

_WORD_BITS = 62  # bits of a reachable-sums mask per gathered int64 (kept clear of the sign bit)
_HEADER = 2  # summary = [tiles buffered, rows buffered, mask words...]


@dataclass
class StepOptions:
    """What one rank can take this step: the rows due now and every reachable tile sum."""

    forced: List[int]
    """Buffer indices that must be taken now (deadline reached), at most num_micro of them."""
    optional: List[int]
    """The other buffer indices, youngest first (the dynamic program's order)."""
    tiles: List[int]
    forced_tiles: int
    slots: int
    """How many optional rows fill the step (num_micro - len(forced), or fewer when the buffer is short)."""
    table: List[List[int]]
    """table[j][k]: bitmask of tile sums reachable with k of the first j optional rows."""

    @property
    def reachable(self) -> int:
        """Bitmask of the step's reachable tile sums (forced rows included)."""
        return self.table[-1][self.slots] << self.forced_tiles

    def nearest(self, target: int) -> int:
        return nearest_set_bit(self.reachable, target)

    def take(self, target: int) -> List[int]:
        """Buffer indices (ascending: stream order) of a choice whose tile sum is the reachable sum
        nearest `target` (the lower one on a tie); among equal sums the older rows are preferred."""
        remaining = self.nearest(target) - self.forced_tiles
        k, chosen = self.slots, list(self.forced)
        for j in range(len(self.optional), 0, -1):  # oldest first: take a row whenever the rest can still fit
            if k == 0:
                break
            v = self.tiles[self.optional[j - 1]]
            if remaining >= v and (self.table[j - 1][k - 1] >> (remaining - v)) & 1:
                chosen.append(self.optional[j - 1])
                remaining -= v
                k -= 1
        assert k == 0 and remaining == 0, "internal error: backtracking left the reachable set"
        return sorted(chosen)


def nearest_set_bit(mask: int, target: int) -> int:
    """The position of the set bit of `mask` nearest `target` (the lower one on a tie)."""
    if mask <= 0:
        raise ValueError("no reachable sum")
    target = max(0, target)
    below = mask & ((1 << (target + 1)) - 1)
    low = below.bit_length() - 1 if below else None
    above = mask >> target
    high = target + (above & -above).bit_length() - 1 if above else None
    if low is None:
        return high
    if high is None or target - low <= high - target:
        return low
    return high


def step_options(tiles: Sequence[int], deadlines: Sequence[int], step: int, num_micro: int) -> StepOptions:
    """The choices of one rank at `step`. Buffer index order is stream order (oldest first).

    Rows with deadline <= step are forced (the most urgent num_micro of them if, after a change of
    num_micro on resume, more are due). A buffer shorter than num_micro yields all of it."""
    if len(tiles) != len(deadlines):
        raise ValueError(f"{len(tiles)} tile counts but {len(deadlines)} deadlines")
    if num_micro < 1:
        raise ValueError(f"num_micro must be >= 1, got {num_micro}")
    tiles = [int(t) for t in tiles]
    if any(t < 0 for t in tiles):
        raise ValueError("tile counts must be >= 0")
    urgent = sorted(range(len(tiles)), key=lambda i: (deadlines[i], i))
    forced = sorted(i for i in urgent[:num_micro] if deadlines[i] <= step)
    taken = set(forced)
    optional = [i for i in reversed(range(len(tiles))) if i not in taken]  # youngest first
    slots = min(num_micro, len(tiles)) - len(forced)
    table = [[1] + [0] * slots]
    for i in optional:
        prev, v = table[-1], tiles[i]
        table.append([prev[0]] + [prev[k] | (prev[k - 1] << v) for k in range(1, slots + 1)])
    return StepOptions(forced, optional, tiles, sum(tiles[i] for i in forced), slots, table)


def summary_length(max_sum: int) -> int:
    return _HEADER + (max_sum + 1 + _WORD_BITS - 1) // _WORD_BITS


def summarize(options: StepOptions, max_sum: int) -> List[int]:
    """The integers one rank contributes to the all-gather: [tiles buffered, rows buffered, mask
    words]. Sums above `max_sum` (which no valid configuration reaches) are folded into max_sum."""
    mask = options.reachable
    if mask >> (max_sum + 1):
        mask = (mask & ((1 << (max_sum + 1)) - 1)) | (1 << max_sum)
    words = [(mask >> (w * _WORD_BITS)) & ((1 << _WORD_BITS) - 1) for w in range(summary_length(max_sum) - _HEADER)]
    return [sum(options.tiles), len(options.tiles), *words]


def _masks(summaries: Sequence[Sequence[int]], max_sum: int) -> np.ndarray:
    """[ranks, max_sum + 1] bool: reachable sums per rank."""
    words = np.asarray([list(s[_HEADER:]) for s in summaries], dtype=np.int64)
    bits = (words[:, :, None] >> np.arange(_WORD_BITS, dtype=np.int64)) & 1
    return bits.reshape(len(summaries), -1)[:, : max_sum + 1].astype(bool)


def choose_target(summaries: Sequence[Sequence[int]], num_micro: int, max_sum: int) -> int:
    """The step's common tile target from every rank's summary; the same on every rank.

    For each candidate T in 0..max_sum every rank would reach its reachable sum nearest T (lower on
    a tie); T minimises max - mean of those sums (the idle vision work of the step), then the
    distance to num_micro x (tiles / rows over all buffers), then T itself."""
    if not summaries:
        raise ValueError("no summaries")
    if any(len(s) != summary_length(max_sum) for s in summaries):
        raise ValueError("summaries of different lengths: the ranks disagree on max_sum")
    reach = _masks(summaries, max_sum)
    if not reach.any(axis=1).all():
        raise ValueError("a rank has no reachable sum")
    width = max_sum + 1
    positions = np.arange(width)
    big = 4 * width
    below = np.maximum.accumulate(np.where(reach, positions, -big), axis=1)
    above = np.minimum.accumulate(np.where(reach, positions, big)[:, ::-1], axis=1)[:, ::-1]
    reached = np.where(positions - below <= above - positions, below, above)  # [ranks, T]
    # Integer work per rank scaled by the number of ranks: max*R - sum is exact, no float ties.
    idle = reached.max(axis=0) * reached.shape[0] - reached.sum(axis=0)
    rows = sum(int(s[1]) for s in summaries)
    total = sum(int(s[0]) for s in summaries)
    # Distance to the drift-free target num_micro * total / rows, exactly, in units of 1 / rows.
    drift = np.abs(positions * rows - num_micro * total) if rows else np.zeros(width, dtype=np.int64)
    order = np.lexsort((positions, drift, idle))
    return int(order[0])


def plan_step(
    buffers: Sequence[Tuple[Sequence[int], Sequence[int]]], step: int, num_micro: int, max_sum: int
) -> Tuple[int, List[List[int]]]:
    """Every rank's choice at once (what the ranks compute together): (target, chosen indices per rank).
    `buffers[r]` is rank r's (tiles, deadlines)."""
    options = [step_options(t, d, step, num_micro) for t, d in buffers]
    target = choose_target([summarize(o, max_sum) for o in options], num_micro, max_sum)
    return target, [o.take(target) for o in options]


# --- the per-rank buffer around a loader ---------------------------------------------------------


Gather = Callable[[List[int]], List[List[int]]]
"""All-gathers one list of ints per data-parallel rank (same length everywhere); returns all, by rank."""


class RankBalancedLoader:
    """Iterates rows (objects with `num_tiles`, e.g. RawBatch) from `loader`, `num_micro` per step,
    chosen through a look-ahead buffer so that the data-parallel ranks' step tile sums agree.

    Consumers must read exactly `num_micro` rows per step (the training step does). `gather` is the
    collective (None: no balancing, rows come out in stream order, which only drains a restored
    buffer). `save_state_rank()` returns the loader's state plus the buffered rows themselves, so a
    resumed run takes exactly the same steps."""

    def __init__(
        self,
        loader,
        num_micro: int,
        lookahead: int,
        max_delay: int,
        max_row_tiles: int,
        gather: Optional[Gather],
        state: Optional[Dict[str, Any]] = None,
    ):
        if num_micro < 1 or lookahead < 0 or max_delay < 0 or max_row_tiles < 0:
            raise ValueError("num_micro >= 1, lookahead >= 0, max_delay >= 0 and max_row_tiles >= 0 are required")
        self.loader = loader
        self.num_micro, self.lookahead, self.max_delay = num_micro, lookahead, max_delay
        self.max_sum = num_micro * max_row_tiles
        self.gather = gather
        self._iter: Optional[Iterator] = None
        self._exhausted = False
        self.step = 0
        """Selections made so far (this rank's steps since the loader started)."""
        self.pulled = 0
        """Rows read from `loader` so far: the next row's stream index."""
        self.buffer: List[Tuple[int, Any]] = []  # (deadline, row), stream order
        self.pending: List[Any] = []  # this step's chosen rows not yet handed out
        self.last_target: Optional[int] = None
        if gather is not None:
            logger.info(
                "balancing vision tiles across data-parallel ranks: each step's %d micro-batches are chosen "
                "from %d ready rows; no row runs more than %d steps late",
                num_micro,
                num_micro + lookahead,
                max_delay,
            )
        # Row q would run at step origin_step + (q - origin_q) // num_micro without balancing.
        self.origin_q, self.origin_step = 0, 0
        if state is not None:
            self.step, self.pulled = int(state["step"]), int(state["pulled"])
            self.pending = list(state["pending"])
            if state["num_micro"] == num_micro:
                self.buffer = [(int(d), row) for d, row in state["buffer"]]
                self.origin_q, self.origin_step = int(state["origin_q"]), int(state["origin_step"])
            else:  # another global batch or layout: the restored rows are due first, in their order (at
                # most num_micro per step, so the deadline rule holds), and new rows queue behind them
                self.buffer = [(self.step + i // num_micro, row) for i, (_, row) in enumerate(state["buffer"])]
                self.origin_q = self.pulled
                self.origin_step = self.step + -(-len(self.buffer) // num_micro)

    def __iter__(self):
        return self

    def _fill(self) -> None:
        want = self.num_micro + (self.lookahead if self.gather is not None else 0)
        while len(self.buffer) < want and not self._exhausted:
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                row = next(self._iter)
            except StopIteration:
                self._exhausted = True
                break
            in_order = self.origin_step + (self.pulled - self.origin_q) // self.num_micro
            self.buffer.append((in_order + self.max_delay, row))
            self.pulled += 1

    def _select(self) -> None:
        self._fill()
        if not self.buffer:
            raise StopIteration
        tiles = [row.num_tiles for _, row in self.buffer]
        deadlines = [d for d, _ in self.buffer]
        if self.gather is None or self._exhausted:  # stream order (a finite loader's tail is not balanced)
            chosen = list(range(min(self.num_micro, len(self.buffer))))
        else:
            options = step_options(tiles, deadlines, self.step, self.num_micro)
            summaries = self.gather(summarize(options, self.max_sum))
            self.last_target = choose_target(summaries, self.num_micro, self.max_sum)
            chosen = options.take(self.last_target)
        taken = set(chosen)
        self.pending = [self.buffer[i][1] for i in chosen]
        self.buffer = [entry for i, entry in enumerate(self.buffer) if i not in taken]
        self.step += 1

    def __next__(self):
        if not self.pending:
            self._select()
        return self.pending.pop(0)

    def save_state_rank(self) -> Dict[str, Any]:
        return {
            "loader": self.loader.save_state_rank(),
            "balance": {
                "step": self.step,
                "pulled": self.pulled,
                "num_micro": self.num_micro,
                "origin_q": self.origin_q,
                "origin_step": self.origin_step,
                "buffer": [(d, row) for d, row in self.buffer],
                "pending": list(self.pending),
            },
        }


def split_loader_state(state: Any) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """A saved loader state -> (the energon loader's state, the balance buffer's state or None).
    States saved without balancing are the energon state itself."""
    if isinstance(state, dict) and "balance" in state:
        return state["loader"], state["balance"]
    return state, None


def balanced_loader(
    loader,
    num_micro: int,
    data_parallel_size: int,
    enabled: bool,
    lookahead: int,
    max_delay: int,
    max_row_tiles: int,
    gather: Gather,
    state: Optional[Dict[str, Any]] = None,
):
    """`loader` wrapped in a RankBalancedLoader when balancing applies (enabled, more than one
    data-parallel rank), or to hand out the rows of a restored buffer first; else `loader` itself.
    `state` is the balance part of a saved state (`split_loader_state`)."""
    balancing = enabled and data_parallel_size > 1
    leftover = state is not None and (state["buffer"] or state["pending"])
    if not balancing and not leftover:
        return loader
    return RankBalancedLoader(
        loader, num_micro, lookahead, max_delay, max_row_tiles, gather if balancing else None, state=state
    )
