"""The energon loader end to end: bad shard entries skipped and counted (no worker dies, no valid
sample lost), exact resume from a saved loader state, weighted blends, decode failures."""

import logging
from collections import Counter

import pytest
import torch

from sail_megatron.config.data import DataConfig
from sail_megatron.data.blend import write_blend
from sail_megatron.data.decode import BatchMaterializer, build_tile_decoder
from sail_megatron.data.loader import build_train_loader
from sail_megatron.data.prepare import _ShardWriter, run_energon_prepare
from sail_megatron.data.task_encoder import RawBatch
from sail_megatron.data.tiling import TilePlan
from sail_megatron.data.tokenizer import build_demo_tokenizer, load_tokenizer
from tests.data import bad_inputs

TILE, PER_TILE = 56, 4


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = ["what is this picture", "a picture of noise", "the caption says hello"] * 10
    return build_demo_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


def _conversation(text="<image>\nwhat is this picture"):
    return {
        "kind": "conversation",
        "turns": [{"role": "user", "text": text}, {"role": "assistant", "text": "a picture of noise"}],
    }


def _write(out, entries):
    """Shards written directly, bypassing prepare's checks, as another tool might have made them."""
    out.mkdir()
    writer = _ShardWriter(out, shard_size=3)
    for meta, images in entries:
        writer.write({**meta, "num_images": len(images)}, images)
    writer.close()
    run_energon_prepare(out, "1,0,0")
    return out


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    entries, valid = [], 0
    for name, (data, ext, reason) in bad_inputs.cases().items():
        entries.append(({**_conversation(), "id": name}, [(data, ext)]))
        valid += reason is None
    entries.append(
        (
            {**_conversation("<image> and <image>"), "id": "placeholder_mismatch"},
            [(bad_inputs.cases()["good"][0], "jpg")],
        )
    )
    entries.append(({"id": "broken_json"}, []))  # no kind/turns
    entries.append(({**_conversation("no image here"), "id": "text_only"}, []))
    return _write(tmp_path_factory.mktemp("shards") / "bad", entries), valid + 1


def _loader(path, tokenizer_dir, num_workers=0, shuffle=0, state=None, packing=False, buffer=256):
    cfg = DataConfig(
        path=str(path),
        tokenizer=str(tokenizer_dir),
        seq_length=128,
        micro_batch_size=1,
        max_tiles=4,
        num_workers=num_workers,
        shuffle_buffer_size=shuffle,
        packing=packing,
        max_tiles_per_pack=16,
        packing_buffer_size=buffer,
    )
    return build_train_loader(cfg, load_tokenizer(tokenizer_dir), TILE, PER_TILE, state=state)


def test_bad_entries_are_skipped_and_counted(bad_shards, tokenizer_dir, caplog):
    path, n_valid = bad_shards
    caplog.set_level(logging.WARNING, logger="sail_megatron.data.task_encoder")
    it = iter(_loader(path, tokenizer_dir))
    batches = [next(it) for _ in range(n_valid + 1)]  # one epoch, plus one batch carrying the last counts
    keys = [b.keys[0] for b in batches[:n_valid]]
    assert len(set(keys)) == n_valid, "every valid sample exactly once per epoch"
    skipped = sum((Counter(b.skipped) for b in batches), Counter())
    expected = Counter(r for _, _, r in bad_inputs.cases().values() if r)
    expected.update(malformed=2)
    for reason, n in expected.items():
        assert n <= skipped[reason] <= 2 * n, (reason, skipped)
    assert set(skipped) == set(expected)
    assert any("bad/shard-" in r.message and "image_truncated" in r.message for r in caplog.records)


def test_worker_process_survives_bad_entries(bad_shards, tokenizer_dir):
    path, n_valid = bad_shards
    it = iter(_loader(path, tokenizer_dir, num_workers=1))
    batches = [next(it) for _ in range(2 * n_valid)]
    assert len({b.keys[0] for b in batches}) == n_valid
    assert sum(sum(b.skipped.values()) for b in batches) >= 1


def test_valid_odd_images_decode_to_tiles(bad_shards, tokenizer_dir):
    path, n_valid = bad_shards
    it = iter(_loader(path, tokenizer_dir))
    materialize = BatchMaterializer(
        build_tile_decoder("auto", torch.device("cpu")),
        TILE,
        torch.device("cpu"),
        PER_TILE,
        load_tokenizer(tokenizer_dir).ids.img_context,
    )
    for _ in range(n_valid):
        batch = materialize(next(it))
        ctx = int((batch.tokens == load_tokenizer(tokenizer_dir).ids.img_context).sum())
        assert ctx == batch.pixel_values.shape[0] * PER_TILE
        assert torch.isfinite(batch.pixel_values).all()


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    good = bad_inputs.cases()["good"][0]
    caption = {"kind": "caption", "turns": [{"role": "caption", "text": "the caption says hello"}]}
    _write(root / "captions", [({**caption, "id": f"c{i}"}, [(good, "jpg")]) for i in range(12)])
    _write(root / "sft", [({**_conversation(), "id": f"s{i}"}, [(good, "jpg")]) for i in range(12)])
    return root


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_resume_from_saved_state_gives_the_same_batches(two_datasets, tokenizer_dir, packing):
    path = two_datasets / "sft"
    loader = _loader(path, tokenizer_dir, num_workers=1, shuffle=8, packing=packing, buffer=8)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.save_state_rank()
    expected = [next(it) for _ in range(6)]
    resumed = iter(_loader(path, tokenizer_dir, num_workers=1, shuffle=8, state=state, packing=packing, buffer=8))
    got = [next(resumed) for _ in range(6)]
    assert [b.keys for b in got] == [b.keys for b in expected]
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(got, expected))


def test_blend_mixes_both_datasets(two_datasets, tokenizer_dir):
    blend = write_blend(two_datasets / "blend.yaml", {"captions": 3.0, "sft": 1.0})
    it = iter(_loader(blend, tokenizer_dir, shuffle=8))
    sources = Counter(next(it).keys[0].split("/")[0] for _ in range(80))
    assert set(sources) == {"captions", "sft"}
    assert sources["captions"] > sources["sft"], sources


def test_blend_rejects_unprepared_folder(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(FileNotFoundError, match="sail-data prepare"):
        write_blend(tmp_path / "b.yaml", {"raw": 1.0})


def test_decode_failure_masks_only_that_sample():
    good = bad_inputs.cases()["good"][0]

    def decoder(images, plans, tile_size):
        if any(img == b"bad" for img in images):
            raise RuntimeError("decoder error")
        return torch.ones(sum(p.num_tiles for p in plans), 3, tile_size, tile_size)

    raw = RawBatch(
        keys=["a", "b"],
        tokens=torch.zeros(2, 8, dtype=torch.long),
        labels=torch.zeros(2, 8, dtype=torch.long),
        loss_mask=torch.ones(2, 8),
        position_ids=torch.zeros(2, 8, dtype=torch.long),
        images=[good, b"bad"],
        plans=[TilePlan(1, 1, False), TilePlan(2, 1, True)],
        image_sample=[0, 1],
        spans=[(0, 0, 8), (1, 0, 8)],
        skipped={"image_empty": 2},
    )
    materialize = BatchMaterializer(decoder, TILE, torch.device("cpu"))
    batch = materialize(raw)
    assert batch.pixel_values.shape[0] == 1 + 3
    assert batch.pixel_values[0].eq(1).all() and batch.pixel_values[1:].eq(0).all()
    assert batch.loss_mask[0].sum() == 8 and batch.loss_mask[1].sum() == 0
    assert materialize.skipped == {"decode_failed": 1, "image_empty": 2}
    assert raw.loss_mask.sum() == 16, "the loader's batch is not modified"


def test_packed_rows_hold_every_valid_sample_once(bad_shards, tokenizer_dir):
    path, n_valid = bad_shards
    it = iter(_loader(path, tokenizer_dir, packing=True, buffer=n_valid))  # one buffer = one epoch
    keys, rows = [], 0
    materialize = BatchMaterializer(
        build_tile_decoder("pil", torch.device("cpu")),
        TILE,
        torch.device("cpu"),
        PER_TILE,
        load_tokenizer(tokenizer_dir).ids.img_context,
    )
    ctx_id = load_tokenizer(tokenizer_dir).ids.img_context
    while len(keys) < n_valid:
        raw = next(it)
        rows += 1
        assert raw.tokens.shape == (1, 128)
        cu = raw.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == 128 and len(cu) >= len(raw.keys) + 1
        for (row, start, end), (a, b) in zip(raw.spans, zip(cu, cu[1:])):
            assert (row, start, end) == (0, a, b), "spans follow cu_seqlens"
            assert raw.position_ids[0, start] == 0 and raw.position_ids[0, end - 1] == end - start - 1
        assert raw.num_tiles <= 16
        batch = materialize(raw)
        assert int((batch.tokens == ctx_id).sum()) == batch.pixel_values.shape[0] * PER_TILE
        keys += raw.keys
    assert len(keys) == n_valid == len(set(keys)), "each valid sample exactly once in the epoch's packs"
    assert rows < n_valid, "rows hold several samples"


def test_materializer_rejects_tile_token_disagreement():
    raw = RawBatch(
        keys=["a"],
        tokens=torch.tensor([[5, 5, 5, 1]]),
        labels=torch.zeros(1, 4, dtype=torch.long),
        loss_mask=torch.ones(1, 4),
        position_ids=torch.arange(4)[None],
        images=[b"x"],
        plans=[TilePlan(1, 1, False)],
        image_sample=[0],
        spans=[(0, 0, 4)],
    )
    materialize = BatchMaterializer(lambda *a: torch.zeros(1, 3, TILE, TILE), TILE, torch.device("cpu"), PER_TILE, 5)
    with pytest.raises(ValueError, match="3 image tokens for 1 tiles x 4 tokens"):
        materialize(raw)


def _skip_log_counts(records) -> Counter:
    """Reasons of the task encoder's 'skipping sample KEY: REASON: detail' lines."""
    return Counter(
        r.args[1]
        for r in records
        if r.name == "sail_megatron.data.task_encoder" and r.getMessage().startswith("skipping sample")
    )


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_every_logged_skip_is_counted_once(bad_shards, tokenizer_dir, caplog, packing):
    path, n_valid = bad_shards
    caplog.set_level(logging.WARNING, logger="sail_megatron.data.task_encoder")
    blank = lambda images, plans, size: torch.zeros(sum(p.num_tiles for p in plans), 3, size, size)  # noqa: E731
    materialize = BatchMaterializer(blank, TILE, torch.device("cpu"))  # holds what the trainer prints
    # In-process workers: every skip logged so far was made before the batch in hand was built.
    it = iter(_loader(path, tokenizer_dir, packing=packing, buffer=n_valid))
    keys = []
    while len(set(keys)) < n_valid or not materialize.skipped:
        raw = next(it)
        materialize(raw)
        keys += raw.keys
        assert materialize.skipped == _skip_log_counts(caplog.records)
    expected = Counter(r for _, _, r in bad_inputs.cases().values() if r)
    expected.update(malformed=2)
    assert set(materialize.skipped) == set(expected)
    assert all(materialize.skipped[reason] >= n for reason, n in expected.items()), materialize.skipped


@pytest.fixture(scope="module")
def literal_control_shards(tmp_path_factory):
    good = bad_inputs.cases()["good"][0]
    control = "<IMG_CONTEXT><img></img> <|im_end|> <|im_start|>assistant\n"
    entries = [
        ({**_conversation(f"<image>\nwhat is {control} this picture"), "id": "literal_user"}, [(good, "jpg")]),
        (
            {
                "kind": "conversation",
                "id": "literal_answer",
                "turns": [
                    {"role": "user", "text": "<image>\nwhat is this picture"},
                    {"role": "assistant", "text": f"a picture {control} of noise"},
                ],
            },
            [(good, "jpg")],
        ),
    ]
    entries += [({**_conversation(), "id": f"plain{i}"}, [(good, "jpg")]) for i in range(4)]
    return _write(tmp_path_factory.mktemp("literal") / "literal", entries)


def test_control_token_strings_in_text_train_as_text(literal_control_shards, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    it = iter(_loader(literal_control_shards, tokenizer_dir, packing=True, buffer=6))
    materialize = BatchMaterializer(
        build_tile_decoder("pil", torch.device("cpu")), TILE, torch.device("cpu"), PER_TILE, tok.ids.img_context
    )
    keys = []
    while len(set(keys)) < 6:
        raw = next(it)
        batch = materialize(raw)  # raises if the text held extra image-context ids
        assert not raw.skipped
        for key, (row, start, end) in zip(raw.keys, raw.spans):  # one user turn, one answer, one image each
            span = raw.tokens[row, start:end].tolist()
            assert span.count(tok.ids.im_start) == 2 and span.count(tok.ids.im_end) == 2, key
            assert span.count(tok.ids.img_start) == span.count(tok.ids.img_end) == 1, key
        assert int((batch.tokens == tok.ids.img_context).sum()) == batch.pixel_values.shape[0] * PER_TILE
        keys += raw.keys


def test_tile_token_disagreement_names_the_sample():
    tokens = torch.tensor([[5, 5, 5, 5, 1, 5, 5, 5, 5, 5]])  # 4 image tokens in the first sample, 5 in the second
    raw = RawBatch(
        keys=["ds/shard-0.tar/ok", "ds/shard-0.tar/bad"],
        tokens=tokens,
        labels=torch.zeros(1, 10, dtype=torch.long),
        loss_mask=torch.ones(1, 10),
        position_ids=torch.arange(10)[None],
        images=[b"x", b"y"],
        plans=[TilePlan(1, 1, False), TilePlan(1, 1, False)],
        image_sample=[0, 1],
        spans=[(0, 0, 5), (0, 5, 10)],
    )
    materialize = BatchMaterializer(lambda *a: torch.zeros(2, 3, TILE, TILE), TILE, torch.device("cpu"), PER_TILE, 5)
    with pytest.raises(ValueError) as err:
        materialize(raw)
    msg = str(err.value)
    assert "text and the tile plan disagree" in msg
    assert "sample ds/shard-0.tar/bad (5 image tokens, 1 tiles x 4 expected)" in msg
    assert "sample ds/shard-0.tar/ok" not in msg


def test_each_skip_is_seen_by_one_data_parallel_rank(bad_shards, tokenizer_dir, caplog):
    # Ranks read disjoint slices of the data: the run's skip count is the sum over data-parallel ranks,
    # and a rank alone (the one that prints) may see none of them.
    path, n_valid = bad_shards
    caplog.set_level(logging.WARNING, logger="sail_megatron.data.task_encoder")
    cfg = DataConfig(
        path=str(path),
        tokenizer=str(tokenizer_dir),
        seq_length=128,
        micro_batch_size=1,
        max_tiles=4,
        num_workers=0,
        shuffle_buffer_size=0,
        packing=True,
        max_tiles_per_pack=16,
        packing_buffer_size=n_valid,
    )
    seen = []
    for rank in (0, 1):
        caplog.clear()
        it = iter(build_train_loader(cfg, load_tokenizer(tokenizer_dir), TILE, PER_TILE, rank, 2))
        counted = sum((Counter(next(it).skipped) for _ in range(n_valid)), Counter())
        assert counted == _skip_log_counts(caplog.records)
        seen.append({r.args[0] for r in caplog.records if r.getMessage().startswith("skipping sample")})
    n_bad = len(bad_inputs.cases()) + 3 - n_valid
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == n_bad


def test_raw_batches_pin_their_text_tensors(monkeypatch):
    """torch's loader pin thread pins only tensors and containers, and calls pin_memory() on anything else:
    a micro-batch's text tensors must come out page-locked (the GPU copy is then asynchronous)."""
    from sail_megatron.data.task_encoder import RawBatch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t.clone())
    tokens = torch.zeros(1, 8, dtype=torch.int64)
    raw = RawBatch(
        keys=["a"],
        tokens=tokens,
        labels=tokens.clone(),
        loss_mask=torch.ones(1, 8),
        position_ids=tokens.clone(),
        images=[b"jpeg"],
        plans=[],
        image_sample=[0],
        cu_seqlens=torch.tensor([0, 8], dtype=torch.int32),
    )
    out = torch.utils.data._utils.pin_memory.pin_memory(raw)
    assert isinstance(out, RawBatch) and out.images == [b"jpeg"]
    assert len(pinned) == 5 and all(t.shape[-1] in (8, 2) for t in pinned)
