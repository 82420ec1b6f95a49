"""Cross-rank tile balance (data/rank_balance.py): every row taken exactly once within its deadline, the
choice is the reachable sum nearest the target, the step's tiles agree across ranks, the choice is a
deterministic function of the gathered summaries (two gloo ranks agree), and the look-ahead buffer
survives a checkpoint round trip exactly."""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from sail_megatron.config import ConfigError
from sail_megatron.config.data import DataConfig
from sail_megatron.data.packing import plan_packs
from sail_megatron.data.rank_balance import (
    RankBalancedLoader,
    balanced_loader,
    choose_target,
    plan_step,
    split_loader_state,
    step_options,
    summarize,
)
from sail_megatron.data.task_encoder import RawBatch
from sail_megatron.data.tiling import TilePlan
from tests.data.test_packing import sft_like
from tests.helpers.multiprocess import run_on_ranks


@dataclass
class Row:
    index: int
    num_tiles: int


class FakeLoader:
    """A savable loader over a list of tile counts: its state is how many rows it has handed out."""

    def __init__(self, tiles, start: int = 0, row=Row):
        self.tiles, self.pos, self.row = list(tiles), start, row

    def __iter__(self):
        while self.pos < len(self.tiles):
            self.pos += 1
            yield self.row(self.pos - 1, self.tiles[self.pos - 1])

    def save_state_rank(self):
        return self.pos


def simulate(streams, steps: int, micro: int, lookahead: int, max_delay: int, max_row_tiles: int):
    """What the ranks do together, with plan_step for the all-gather: (targets, stream indices taken
    per step and rank)."""
    buffers = [[] for _ in streams]  # (stream index, deadline, tiles)
    pulled = [0] * len(streams)
    targets, taken = [], []
    for step in range(steps):
        for r, stream in enumerate(streams):
            while len(buffers[r]) < micro + lookahead:
                q = pulled[r]
                buffers[r].append((q, q // micro + max_delay, stream[q]))
                pulled[r] += 1
        target, chosen = plan_step(
            [([t for *_, t in b], [d for _, d, _ in b]) for b in buffers], step, micro, micro * max_row_tiles
        )
        targets.append(target)
        taken.append([[buffers[r][i][0] for i in c] for r, c in enumerate(chosen)])
        for r, c in enumerate(chosen):
            buffers[r] = [e for i, e in enumerate(buffers[r]) if i not in set(c)]
    return targets, taken


def _random_streams(rng, ranks: int, rows: int, max_tiles: int):
    kind = rng.integers(0, 3)
    if kind == 0:  # anything up to the cap
        return [rng.integers(0, max_tiles + 1, rows).tolist() for _ in range(ranks)]
    if kind == 1:  # mostly full rows, some light ones (packed SFT)
        return [
            np.where(rng.random(rows) < 0.15, rng.integers(0, max_tiles, rows), max_tiles).tolist()
            for _ in range(ranks)
        ]
    # ranks of different means: some persistent imbalance
    return [
        np.clip(rng.normal(max_tiles * (0.5 + 0.1 * r), 3, rows), 0, max_tiles).astype(int).tolist()
        for r in range(ranks)
    ]


# --- the pure functions -----------------------------------------------------------------------------


def test_take_reaches_the_nearest_sum_of_any_choice_with_the_due_rows():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, micro = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        tiles = rng.integers(0, 12, n).tolist()
        deadlines = sorted(rng.integers(0, 4, n).tolist())  # stream order: deadlines never decrease
        step, target = int(rng.integers(0, 4)), int(rng.integers(0, 50))
        options = step_options(tiles, deadlines, step, micro)
        chosen = options.take(target)
        due = [i for i in range(n) if deadlines[i] <= step][:micro]
        size = min(micro, n)
        assert len(chosen) == size == len(set(chosen)) and set(due) <= set(chosen) and chosen == sorted(chosen)
        sums = {sum(tiles[i] for i in c) for c in itertools.combinations(range(n), size) if set(due) <= set(c)}
        best = min(sums, key=lambda s: (abs(s - target), s))
        assert sum(tiles[i] for i in chosen) == best == options.nearest(target)
        mask = options.reachable
        assert {b for b in range(mask.bit_length()) if mask >> b & 1} == sums


@pytest.mark.parametrize("seed", range(6))
def test_every_row_is_taken_once_and_never_later_than_its_deadline(seed):
    rng = np.random.default_rng(seed)
    ranks, micro = int(rng.integers(2, 7)), int(rng.integers(1, 7))
    lookahead, max_delay, max_tiles = int(rng.integers(1, 12)), int(rng.integers(1, 7)), int(rng.integers(1, 40))
    steps = 60
    streams = _random_streams(rng, ranks, steps * micro + lookahead + micro, max_tiles)
    _, taken = simulate(streams, steps, micro, lookahead, max_delay, max_tiles)
    for r in range(ranks):
        seen = [q for step in taken for q in step[r]]
        assert all(len(step[r]) == micro for step in taken)
        assert len(seen) == len(set(seen)), "a row was taken twice"
        for step, chosen in enumerate(taken):
            assert chosen[r] == sorted(chosen[r]), "stream order inside the step"
            assert all(step <= q // micro + max_delay for q in chosen[r]), "a row ran after its deadline"
        # Rows that fell due within the simulated steps were all taken: nothing starves or is lost.
        assert set(range((steps - max_delay) * micro)) <= set(seen)
        assert max(seen) < (steps * micro) + lookahead


def _packed_rows(rank: int, rows: int) -> list[int]:
    """One rank's packed rows of SFT-like samples (512-sample packing buffers, seq 4096, 40 tiles)."""
    out, chunk = [], 0
    while len(out) < rows:
        tokens, tiles = sft_like(512, seed=rank * 1000 + chunk)
        out += plan_packs(tokens, tiles, 4096, 40, seed=chunk).tiles_per_pack(tiles)
        chunk += 1
    return out[:rows]


def test_balance_on_packed_sft_rows():
    ranks, micro, steps, lookahead, max_delay = 8, 4, 150, 8, 8
    streams = [_packed_rows(r, steps * micro + lookahead + micro) for r in range(ranks)]
    before = np.array([[sum(s[k * micro : (k + 1) * micro]) for s in streams] for k in range(steps)])
    _, taken = simulate(streams, steps, micro, lookahead, max_delay, 40)
    after = np.array([[sum(streams[r][q] for q in step[r]) for r in range(ranks)] for step in taken])

    def ratio(sums):
        return float(np.mean(sums.max(axis=1) / sums.mean(axis=1)))

    assert ratio(after) <= 1.05, ratio(after)
    assert ratio(after) < ratio(before) - 0.02, (ratio(before), ratio(after))


def test_choice_is_deterministic_and_independent_of_rank_order():
    rng = np.random.default_rng(3)
    micro, max_sum = 4, 4 * 40
    for _ in range(50):
        buffers = [(rng.integers(0, 41, 12).tolist(), sorted(rng.integers(0, 3, 12).tolist())) for _ in range(5)]
        summaries = [summarize(step_options(t, d, 1, micro), max_sum) for t, d in buffers]
        target = choose_target(summaries, micro, max_sum)
        assert choose_target(summaries[::-1], micro, max_sum) == target
        assert choose_target([list(s) for s in summaries], micro, max_sum) == target
        assert plan_step(buffers, 1, micro, max_sum) == plan_step(buffers, 1, micro, max_sum)


def test_target_evens_out_reachable_sums():
    # Rank 0 can reach 20 or 40, rank 1 anything from 20 to 60 in steps of 10: both take 40, the one
    # nearest num_micro x mean tiles per row (2 x 130 / 7 = 37.1).
    micro, max_sum = 2, 80
    options = [step_options([10, 10, 30], [5, 5, 5], 0, micro), step_options([5, 15, 25, 35], [5, 5, 5, 5], 0, micro)]
    target = choose_target([summarize(o, max_sum) for o in options], micro, max_sum)
    assert target == 37 and [o.nearest(target) for o in options] == [40, 40]


# --- the buffer around a loader -------------------------------------------------------------------


def _raw_row(index: int, tiles: int) -> RawBatch:
    tokens = torch.arange(8)[None] + index
    return RawBatch(
        keys=[f"s{index}"],
        tokens=tokens,
        labels=tokens,
        loss_mask=torch.ones(1, 8),
        position_ids=torch.arange(8)[None],
        images=[bytes([index % 256]) * 16] * tiles,
        plans=[TilePlan(1, 1, False)] * tiles,
        image_sample=[0] * tiles,
        spans=[(0, 0, 8)],
    )


def test_buffer_state_round_trip_continues_exactly(tmp_path):
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 9, 400).tolist()
    micro, lookahead, max_delay = 3, 5, 2
    # Two identical "ranks": the gather is local, the choice still follows the drift-free target.
    gather = lambda v: [v, v]  # noqa: E731
    first = RankBalancedLoader(FakeLoader(tiles, row=_raw_row), micro, lookahead, max_delay, 8, gather)
    for _ in range(7 * micro):
        next(first)
    buf = io.BytesIO()
    torch.save(first.save_state_rank(), buf)  # as the checkpoint's rank_state stores it
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    loader_state, balance_state = split_loader_state(saved)
    assert loader_state == 7 * micro + lookahead and len(balance_state["buffer"]) == lookahead
    resumed = RankBalancedLoader(
        FakeLoader(tiles, start=loader_state, row=_raw_row), micro, lookahead, max_delay, 8, gather, state=balance_state
    )
    ahead = [next(first) for _ in range(20 * micro)]
    again = [next(resumed) for _ in range(20 * micro)]
    assert [r.keys for r in again] == [r.keys for r in ahead]
    assert all(torch.equal(a.tokens, b.tokens) and a.images == b.images for a, b in zip(ahead, again))
    assert [r.keys for r in ahead] != [[f"s{i}"] for i in range(7 * micro, 27 * micro)], "nothing was reordered"


def test_resume_with_another_num_micro_loses_and_repeats_nothing():
    tiles = np.random.default_rng(2).integers(0, 9, 300).tolist()
    gather = lambda v: [v, v]  # noqa: E731
    first = RankBalancedLoader(FakeLoader(tiles), 4, 6, 3, 8, gather)
    seen = [next(first).index for _ in range(10 * 4)]
    state = first.save_state_rank()
    resumed = RankBalancedLoader(FakeLoader(tiles, start=state["loader"]), 2, 6, 3, 8, gather, state=state["balance"])
    pulled, after = state["loader"], 10 + 6 // 2  # new rows queue behind the 6 restored ones: 3 steps of 2
    for step in range(10, 70):
        rows = [next(resumed).index for _ in range(2)]
        seen += rows
        assert all(q < pulled or step <= after + (q - pulled) // 2 + 3 for q in rows), "ran after its deadline"
    assert len(seen) == len(set(seen)) and set(range(100)) <= set(seen)


def test_off_or_one_rank_leaves_the_loader_alone_but_drains_a_restored_buffer():
    loader = FakeLoader([1, 2, 3])
    assert balanced_loader(loader, 2, 1, True, 8, 8, 40, gather=None) is loader
    assert balanced_loader(loader, 2, 4, False, 8, 8, 40, gather=None) is loader
    assert split_loader_state(7) == (7, None)  # a state saved without balancing
    state = {
        "step": 3,
        "pulled": 9,
        "num_micro": 2,
        "origin_q": 0,
        "origin_step": 0,
        "buffer": [(4, Row(7, 5)), (5, Row(8, 1))],
        "pending": [],
    }
    drained = balanced_loader(FakeLoader(list(range(20)), start=9), 2, 4, False, 8, 8, 40, gather=None, state=state)
    assert [next(drained).index for _ in range(4)] == [7, 8, 9, 10]


@pytest.mark.parametrize("field", ["balance_lookahead", "balance_max_delay"])
def test_config_names_the_field(field):
    cfg = DataConfig(path="p", tokenizer="t", **{field: 0})
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.field == f"data.{field}" and "Fix:" in str(info.value)
    DataConfig(path="p", tokenizer="t", balance_tiles_across_ranks=False, **{field: 0}).validate()


# --- two gloo ranks -------------------------------------------------------------------------------


def _stream(rank: int, rows: int) -> list[int]:
    rng = np.random.default_rng(100 + rank)
    return np.where(rng.random(rows) < 0.3, rng.integers(0, 20, rows), 20).tolist()


def balanced_ranks(steps: int, micro: int, lookahead: int, max_delay: int):
    from megatron.core import parallel_state

    from sail_megatron.config import ParallelConfig
    from sail_megatron.platform import destroy_distributed, init_distributed
    from sail_megatron.training.collectives import gather_ints_over_data_parallel

    init_distributed(ParallelConfig(), seed=1)
    try:
        rank = parallel_state.get_data_parallel_rank()
        loader = RankBalancedLoader(
            FakeLoader(_stream(rank, 400)), micro, lookahead, max_delay, 20, gather_ints_over_data_parallel
        )
        targets, rows = [], []
        for _ in range(steps):
            rows.append([next(loader).index for _ in range(micro)])
            targets.append(loader.last_target)
        return {"rank": rank, "targets": targets, "rows": rows}
    finally:
        destroy_distributed()


def test_two_gloo_ranks_agree_on_the_targets():
    steps, micro, lookahead, max_delay = 12, 3, 4, 3
    results = run_on_ranks(balanced_ranks, 2, steps, micro, lookahead, max_delay, timeout=300)
    targets, taken = simulate([_stream(r, 400) for r in range(2)], steps, micro, lookahead, max_delay, 20)
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["targets"] == results[1]["targets"] == targets
    for r in range(2):
        assert results[r]["rows"] == [step[r] for step in taken]
