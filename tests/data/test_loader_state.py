"""A data position carried to another data-parallel size: every energon stream continues exactly where
it stood (checked against the uninterrupted loaders), and rows read ahead for tile balancing are handed
on, each to exactly one new rank."""

import pytest
from megatron.energon.savable_loader import SavableDataLoaderState

from sail_megatron.config.data import DataConfig
from sail_megatron.data.loader import build_train_loader
from sail_megatron.data.loader_state import LoaderLayout, reshard_loader_state, source_ranks, workers_to_continue
from sail_megatron.data.tokenizer import load_tokenizer
from tests.data.test_loader import PER_TILE, TILE, tokenizer_dir, two_datasets  # noqa: F401 (fixtures)
from tests.helpers.loader_workers import stop_loader_workers


def test_workers_keep_the_number_of_streams():
    assert workers_to_continue(LoaderLayout(4, 2), 4, 3) == 2  # same size: what was saved
    assert workers_to_continue(LoaderLayout(4, 2), 2, 2) == 4
    assert workers_to_continue(LoaderLayout(2, 4), 8, 4) == 1
    assert workers_to_continue(LoaderLayout(4, 2), 3, 2) is None  # 8 streams do not divide among 3
    assert workers_to_continue(LoaderLayout(2, 0), 1, 2) is None  # no worker processes: rank-bound
    assert workers_to_continue(LoaderLayout(2, 0), 2, 2) == 0
    assert source_ranks(LoaderLayout(4, 2), LoaderLayout(2, 4), 1) == [2, 3]
    assert source_ranks(LoaderLayout(2, 4), LoaderLayout(8, 1), 5) == [1]
    assert source_ranks(LoaderLayout(3, 2), LoaderLayout(2, 3), 1) == [1, 2]


def _loader(path, tok, rank, world, workers, state=None):
    cfg = DataConfig(
        path=str(path),
        tokenizer=str(tok),
        seq_length=128,
        micro_batch_size=1,
        max_tiles=4,
        num_workers=workers,
        shuffle_buffer_size=4,
        packing=True,
        max_tiles_per_pack=16,
        packing_buffer_size=4,
    )
    return build_train_loader(cfg, load_tokenizer(tok), TILE, PER_TILE, rank, world, seed=3, state=state)


def _read(loader, n):
    it = iter(loader)
    return [tuple(next(it).keys) for _ in range(n)]


def _continue_on(path, tok, saved, states, now):
    """Rows each rank of `now` reads after taking over the saved states."""
    out = []
    for rank in range(now.data_parallel):
        mine = {d: states[d] for d in source_ranks(saved, now, rank)}
        loader = _loader(
            path, tok, rank, now.data_parallel, now.num_workers, reshard_loader_state(mine, saved, now, rank)
        )
        out.append(_read(loader, 4 * now.num_workers))
        stop_loader_workers()  # this loader's: the next one reads alone
    return out


@pytest.mark.parametrize("saved,now", [((2, 1), (1, 2)), ((1, 2), (2, 1))], ids=["2to1", "1to2"])
def test_every_stream_continues_where_it_stood(two_datasets, tokenizer_dir, saved, now):  # noqa: F811
    path, saved, now = two_datasets / "sft", LoaderLayout(*saved), LoaderLayout(*now)
    # The saved run: each rank reads 3 rows, saves, and goes on; what it reads next, per stream, is the truth.
    per_stream = {}
    states = {}
    for rank in range(saved.data_parallel):
        loader = _loader(path, tokenizer_dir, rank, saved.data_parallel, saved.num_workers)
        _read(loader, 3)
        states[rank] = loader.save_state_rank()
        nxt = states[rank].next_worker_id
        rows = _read(loader, 4 * saved.num_workers * 2)
        stop_loader_workers()  # this loader's: the next one reads alone
        for i, row in enumerate(rows):  # a rank reads its workers in turn, starting at next_worker_id
            stream = saved.streams_of(rank).start + (nxt + i) % saved.num_workers
            per_stream.setdefault(stream, []).append(row)
    got = _continue_on(path, tokenizer_dir, saved, states, now)
    for rank, rows in enumerate(got):
        streams = list(now.streams_of(rank))
        start = reshard_loader_state(
            {d: states[d] for d in source_ranks(saved, now, rank)}, saved, now, rank
        ).next_worker_id
        for i, row in enumerate(rows):
            stream = streams[(start + i) % len(streams)]
            assert row == per_stream[stream][i // len(streams)], (rank, i, stream)


class _Row:
    def __init__(self, name):
        self.name = name


def _saved(name, step, pending, buffered):
    energon = SavableDataLoaderState(worker_states=[f"{name}-w0", f"{name}-w1"], next_worker_id=1, micro_batch_size=1)
    balance = {
        "step": step,
        "pulled": 9,
        "num_micro": 2,
        "origin_q": 0,
        "origin_step": 0,
        "buffer": [(step + 1, _Row(f"{name}-b{i}")) for i in range(buffered)],
        "pending": [_Row(f"{name}-p{i}") for i in range(pending)],
    }
    return {"loader": energon, "balance": balance}


def test_read_ahead_rows_go_to_exactly_one_new_rank():
    # 2 ranks x 2 workers -> 4 ranks x 1 worker: each old rank's rows are split between its two successors.
    saved, now = LoaderLayout(2, 2), LoaderLayout(4, 1)
    states = {0: _saved("a", 5, 1, 4), 1: _saved("b", 5, 0, 3)}
    parts = [reshard_loader_state({d: states[d] for d in source_ranks(saved, now, r)}, saved, now, r) for r in range(4)]
    rows = [[row.name for _, row in p["balance"]["buffer"]] for p in parts]
    assert rows == [["a-p0", "a-b1", "a-b3"], ["a-b0", "a-b2"], ["b-b0", "b-b2"], ["b-b1"]]
    assert [p["loader"].worker_states for p in parts] == [["a-w0"], ["a-w1"], ["b-w0"], ["b-w1"]]
    assert all(p["balance"]["step"] == 5 and p["balance"]["num_micro"] is None for p in parts)
    # And back to 1 rank x 4 workers: one rank takes every row, in the old ranks' order.
    (one,) = [reshard_loader_state(states, saved, LoaderLayout(1, 4), 0)]
    assert [row.name for _, row in one["balance"]["buffer"]][:2] == ["a-p0", "a-b0"]
    assert len(one["balance"]["buffer"]) == 8 and one["loader"].worker_states == ["a-w0", "a-w1", "b-w0", "b-w1"]
    assert one["loader"].next_worker_id == 1  # the first old rank's next worker, now local worker 1
