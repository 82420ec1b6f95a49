"""Plan micro-batch packs under a token budget while keeping vision tiles balanced across packs.

Each sample costs `tokens` slots of the language model and `tiles` passes of the vision encoder. A
pack (one micro-batch) holds at most `seq_length` tokens and `max_tiles` tiles. Packing by tokens
alone (first-fit-decreasing) fills slots well but can put 10x the tiles in one micro-batch as in
another, and the slowest vision encoder sets every step's pace.

Algorithm. m = total tiles / ceil(total tokens / seq_length) is the mean tiles per pack if tokens
pack perfectly; the pack count is essentially fixed by the token budget, so m is what balance aims
at. Packs get a hard tile cap C <= max_tiles and are filled by a two-dimensional best fit:
samples, largest first by their scarcer budget (max of tokens / seq_length and tiles / C), go to the
pack minimising (token room left) / seq_length + |tiles after - m| / max(m, 1); a pack opens when none
can take the sample. Text-only samples thus fill packs that already hold their share of tiles, tile
samples go where tiles are missing, and packs end near both budgets. Max/mean is then about C / m,
so C is the smallest cap (never below the largest sample's tiles or ceil(min_utilization * m))
whose plan keeps `min_utilization` of the token slots; if none does, the plan with the best
utilization wins. C is searched upward +1, +2, +4, ... then by bisection: 1-2 plans on real data.
Finally the pack order is shuffled with the seed.

Why not "tile samples by LPT, then text by best fit" (the first idea, measured): LPT leaves every
pack with about the same token gap, which long text-only samples cannot use, and with chunky tile
counts (1, 3-9) it cannot level packs to within one tile. On the tests' SFT-like data it kept 94.0%
of token slots at max/mean 1.13 (88.6% and 1.25 with longer texts); this planner keeps 99.9% at 1.06.
Integer tiles bound any plan: max/mean >= ceil(m') / m' for the plan's mean m'. Weak spot: when a
tile costs few tokens (16-64) and packs fill exactly, the greedy can leave max/mean well above C / m
(still far below first-fit-decreasing's).

Complexity per plan, N samples: O(N log N) to sort, then per sample a scan of the tile levels
0..C cheapest-penalty first with early exit (usually 1-3 levels), each a shift of a Python-int
bitmask of free-token values (seq_length / 64 machine words, done in C): O(N * C * seq_length / 64)
word operations worst case, ~4 us per sample at seq_length 4096. Measured: 100k SFT-like samples
in 0.45 s (one plan), 0.7 s when the search needs two (CPython 3.11, one core).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional, Sequence

import numpy as np

__all__ = ["PackPlan", "plan_packs", "balance_across_ranks"]


@dataclass
class PackPlan:
    """Which samples go into which micro-batch, and which samples fit nowhere."""

    packs: list[list[int]] = field(default_factory=list)
    """Sample indices per pack; every sample within both budgets appears exactly once."""
    oversized: list[int] = field(default_factory=list)
    """Samples that alone exceed seq_length or max_tiles: never packed, reported so the caller can act."""

    @property
    def num_packs(self) -> int:
        return len(self.packs)

    def _per_pack(self, counts: Sequence[int]) -> list[int]:
        if not self.packs:
            return []
        values = np.asarray(counts, dtype=np.int64)[np.fromiter(chain.from_iterable(self.packs), np.int64)]
        owner = np.repeat(np.arange(len(self.packs)), [len(pack) for pack in self.packs])
        return np.bincount(owner, weights=values, minlength=len(self.packs)).astype(np.int64).tolist()

    def tokens_per_pack(self, token_counts: Sequence[int]) -> list[int]:
        return self._per_pack(token_counts)

    def tiles_per_pack(self, tile_counts: Sequence[int]) -> list[int]:
        return self._per_pack(tile_counts)

    def token_utilization(self, token_counts: Sequence[int], seq_length: int) -> float:
        """Packed tokens / (packs * seq_length); 1.0 with no packs (no slot is wasted)."""
        if not self.packs:
            return 1.0
        return sum(self.tokens_per_pack(token_counts)) / (len(self.packs) * seq_length)

    def tile_balance(self, tile_counts: Sequence[int]) -> float:
        """Max / mean tiles per pack; 1.0 when no pack has tiles (nothing to balance)."""
        per_pack = self.tiles_per_pack(tile_counts)
        total = sum(per_pack)
        if total == 0:
            return 1.0
        return max(per_pack) * len(per_pack) / total


def _as_counts(values: Sequence[int], name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integers")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {int(arr.min())} at index {int(arr.argmin())}")
    return arr


class _FreeIndex:
    """Packs keyed by free tokens. Bit f of `mask` is set iff some pack has exactly f free tokens, so
    "least free >= t" is the lowest set bit of mask >> t: one C-level operation, no Python loop."""

    __slots__ = ("mask", "by_free")

    def __init__(self) -> None:
        self.mask = 0
        self.by_free: dict[int, dict[int, None]] = {}  # insertion-ordered: deterministic picks

    def add(self, pack: int, free: int) -> None:
        bucket = self.by_free.get(free)
        if bucket is None:
            self.by_free[free] = {pack: None}
            self.mask |= 1 << free
        else:
            bucket[pack] = None

    def pop(self, free: int) -> int:
        bucket = self.by_free[free]
        pack = next(iter(bucket))
        del bucket[pack]
        if not bucket:
            del self.by_free[free]
            self.mask ^= 1 << free
        return pack


def _best_fit(
    order: list[int], tok: list[int], til: list[int], seq_length: int, cap: int, target: float
) -> list[list[int]]:
    """Two-dimensional best fit of `order` into packs of seq_length tokens and `cap` tiles.

    A sample goes to the pack minimising (token room left) / seq_length + |tiles after - target| /
    target, so text fills packs that hold their share of tiles and tile samples go where tiles are
    missing. Every sample must fit alone (tokens <= seq_length, tiles <= cap).
    """
    members: list[list[int]] = []
    free: list[int] = []
    load: list[int] = []
    levels = [_FreeIndex() for _ in range(cap + 1)]  # levels[L]: packs holding exactly L tiles
    token_weight = 1.0 / seq_length
    tile_weight = 1.0 / max(target, 1.0)
    # For each sample tile count v: the admissible levels, cheapest tile penalty first.
    scan = [
        sorted((abs(level + v - target) * tile_weight, level) for level in range(cap - v + 1)) for v in range(cap + 1)
    ]
    for i in order:
        t, v = tok[i], til[i]
        best_score, best_level, best_free = math.inf, -1, -1
        for penalty, level in scan[v]:
            if penalty >= best_score:
                break  # token room only adds to the score
            above = levels[level].mask >> t
            if above:
                f = t + (above & -above).bit_length() - 1
                score = (f - t) * token_weight + penalty
                if score < best_score:
                    best_score, best_level, best_free = score, level, f
        if best_level < 0:  # nothing can take it: open a pack rather than break a budget
            pack = len(members)
            members.append([])
            free.append(seq_length)
            load.append(0)
        else:
            pack = levels[best_level].pop(best_free)
        members[pack].append(i)
        free[pack] -= t
        load[pack] += v
        levels[load[pack]].add(pack, free[pack])
    return members


def _plan_with_cap(
    tokens: np.ndarray, tiles: np.ndarray, fits: np.ndarray, tie: np.ndarray, seq_length: int, cap: int, target: float
) -> list[list[int]]:
    """Packs of the samples `fits` under a tile cap; larger samples first, by the scarcer budget
    (max of tokens / seq_length and tiles / cap, then their sum, then the seeded tie-break)."""
    token_share, tile_share = tokens[fits] / seq_length, tiles[fits] / max(cap, 1)
    order = fits[np.lexsort((tie[fits], -(token_share + tile_share), -np.maximum(token_share, tile_share)))]
    return _best_fit(order.tolist(), tokens.tolist(), tiles.tolist(), seq_length, cap, target)


def plan_packs(
    token_counts: Sequence[int],
    tile_counts: Sequence[int],
    seq_length: int,
    max_tiles: int,
    seed: int = 0,
    *,
    min_utilization: float = 0.97,
) -> PackPlan:
    """Group samples into packs of <= seq_length tokens and <= max_tiles tiles, tiles balanced.

    `min_utilization` is the share of token slots the tile cap may not push the plan below (see the
    module docstring). Deterministic for (inputs, seed): the seed only orders samples with equal
    counts and shuffles the pack order, so heavy packs are not all seen first.
    """
    tokens = _as_counts(token_counts, "token_counts")
    tiles = _as_counts(tile_counts, "tile_counts")
    if tokens.shape != tiles.shape:
        raise ValueError(f"token_counts has {tokens.size} entries but tile_counts has {tiles.size}")
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if max_tiles < 0:
        raise ValueError(f"max_tiles must be >= 0, got {max_tiles}")
    if not 0.0 <= min_utilization <= 1.0:
        raise ValueError(f"min_utilization must be in [0, 1], got {min_utilization}")

    rng = np.random.default_rng(seed)
    tie = rng.permutation(tokens.size)  # seeded order among samples with equal counts
    too_big = (tokens > seq_length) | (tiles > max_tiles)
    oversized = np.flatnonzero(too_big).tolist()
    fits = np.flatnonzero(~too_big)
    if fits.size == 0:
        return PackPlan([], oversized)

    til = tiles.tolist()
    total_tokens = int(tokens[fits].sum())
    total_tiles = int(tiles[fits].sum())
    largest = int(tiles[fits].max())
    smallest = int(tiles[fits][tiles[fits] > 0].min()) if total_tiles else 0
    # Mean tiles per pack if the tokens packed perfectly: the packer's tile target, and the search
    # starts at min_utilization * mean since a lower cap cannot keep min_utilization of the slots.
    mean = total_tiles / max(1, math.ceil(total_tokens / seq_length))
    low = min(max_tiles, max(largest, math.ceil(min_utilization * mean - 1e-9)))

    def plan(cap: int) -> tuple[list[list[int]], float, bool]:
        members = _plan_with_cap(tokens, tiles, fits, tie, seq_length, cap, mean)
        utilization = total_tokens / (len(members) * seq_length)
        # The cap binds if some pack could not take even the smallest tile sample any more.
        binding = total_tiles > 0 and max(sum(til[i] for i in m) for m in members) + smallest > cap
        return members, utilization, binding

    tried: dict[int, tuple[list[list[int]], float, bool]] = {}
    cap, step, failed, good = low, 1, low - 1, None
    while True:  # gallop upward to the first cap that keeps min_utilization
        tried[cap] = plan(cap)
        _, utilization, binding = tried[cap]
        if utilization >= min_utilization:
            good = cap
            break
        failed = cap
        if not binding or cap == max_tiles:
            break  # a larger cap would not change what limits utilization
        cap, step = min(max_tiles, cap + step), step * 2
    while good is not None and good - failed > 1:  # bisect between the last failure and success
        mid = (failed + good) // 2
        tried[mid] = plan(mid)
        if tried[mid][1] >= min_utilization:
            good = mid
        else:
            failed = mid
    chosen: Optional[int] = good
    if chosen is None:  # unreachable target: best utilization, then fewer packs, then smaller cap
        chosen = max(tried, key=lambda c: (tried[c][1], -len(tried[c][0]), -c))

    packs = [sorted(m) for m in tried[chosen][0]]
    return PackPlan([packs[j] for j in rng.permutation(len(packs)).tolist()], oversized)


def balance_across_ranks(
    packs: Sequence[Sequence[int]], tile_counts: Sequence[int], num_groups: int
) -> list[list[list[int]]]:
    """Split one global step's packs into `num_groups` groups of equal size with balanced tiles.

    Groups are (data-parallel rank, micro-batch) slots. Packs go in decreasing tile order, one per
    group per round, the heaviest remaining pack to the lightest group (LPT with equal group
    sizes); ties go to the lower pack / group index, so the result is deterministic.
    O(P log P + P log G) for P packs and G groups.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if len(packs) % num_groups:
        raise ValueError(f"{len(packs)} packs cannot be split into {num_groups} groups of equal size")
    weight = [int(sum(tile_counts[i] for i in pack)) for pack in packs]
    order = sorted(range(len(packs)), key=lambda p: (-weight[p], p))
    groups: list[list[list[int]]] = [[] for _ in range(num_groups)]
    totals = [0] * num_groups
    for start in range(0, len(order), num_groups):
        lightest = sorted(range(num_groups), key=lambda g: (totals[g], g))
        for p, g in zip(order[start : start + num_groups], lightest):
            groups[g].append(list(packs[p]))
            totals[g] += weight[p]
    return groups
