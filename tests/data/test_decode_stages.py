"""Pipeline stages after the first decode no image: same text tensors and tile count, no pixels."""

from types import SimpleNamespace

import pytest
import torch

from sail_megatron.config.data import DEFAULT_MAX_PIXELS
from sail_megatron.data.batch import Batch
from sail_megatron.data.decode import BatchMaterializer
from sail_megatron.data.task_encoder import RawBatch
from sail_megatron.data.tiling import TilePlan
from sail_megatron.model.presets import get_preset
from sail_megatron.training.flops import Trains
from sail_megatron.training.metered_data import MeteredData, build_loader, from_loader

TILE, PER_TILE, IMG = 28, 2, 7
PLANS = [TilePlan(2, 1, True), TilePlan(1, 1, False)]  # 3 + 1 tiles


class CountingDecoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, images, plans, tile_size):
        self.calls += 1
        return torch.ones(sum(p.num_tiles for p in plans), 3, tile_size, tile_size)


def _packed_raw() -> RawBatch:
    """One packed row of two samples: 3 tiles of image tokens in the first, 1 in the second."""
    first = [1] + [IMG] * (3 * PER_TILE) + [2, 3]
    second = [1] + [IMG] * PER_TILE + [4, 5, 6]
    tokens = torch.tensor([first + second])
    n1, n = len(first), tokens.shape[1]
    return RawBatch(
        keys=["a", "b"],
        tokens=tokens,
        labels=tokens.roll(-1, 1),
        loss_mask=torch.ones(1, n),
        position_ids=torch.cat([torch.arange(n1), torch.arange(n - n1)])[None],
        images=[b"first", b"second"],
        plans=PLANS,
        image_sample=[0, 1],
        spans=[(0, 0, n1), (0, n1, n)],
        skipped={"image_empty": 1},
        cu_seqlens=torch.tensor([0, n1, n], dtype=torch.int32),
        max_seqlen=max(n1, n - n1),
    )


def _materializer(decoder, first_stage: bool) -> BatchMaterializer:
    return BatchMaterializer(decoder, TILE, torch.device("cpu"), PER_TILE, IMG, decode_images=first_stage)


def test_later_stage_decodes_nothing_and_keeps_the_text_side():
    first_decoder, later_decoder = CountingDecoder(), CountingDecoder()
    first = _materializer(first_decoder, True)(_packed_raw())
    later_materializer = _materializer(later_decoder, False)
    later = later_materializer(_packed_raw())
    assert first_decoder.calls == 1 and later_decoder.calls == 0
    assert later.pixel_values is None
    assert first.pixel_values.shape == (4, 3, TILE, TILE)
    assert later.num_tiles == first.num_tiles == 4
    for name in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens"):
        assert torch.equal(getattr(later, name), getattr(first, name)), name
    assert later.max_seqlen == first.max_seqlen
    assert later_materializer.skipped == {"image_empty": 1}, "the loader's counts still add up"


def test_later_stage_still_checks_tiles_against_image_tokens():
    raw = _packed_raw()
    raw.plans = [TilePlan(1, 1, False), TilePlan(1, 1, False)]
    with pytest.raises(ValueError, match="image tokens for 2 tiles"):
        _materializer(CountingDecoder(), False)(raw)


def test_metered_tiles_and_flops_are_the_same_on_every_stage():
    tallies = []
    for first_stage in (True, False):
        materialize = _materializer(CountingDecoder(), first_stage)
        data = MeteredData(
            from_loader([_packed_raw(), _packed_raw()], materialize), get_preset("tiny"), Trains(True, True, True)
        )
        next(data), next(data)
        tallies.append(data.take_tally())
    assert tallies[0].tiles == tallies[1].tiles == 8
    assert tallies[0].flops == tallies[1].flops > 0


def test_batch_without_pixels_carries_its_tile_count():
    tokens = torch.zeros(1, 4, dtype=torch.long)
    batch = Batch(
        tokens=tokens, labels=tokens, loss_mask=torch.ones(1, 4), position_ids=tokens, pixel_values=None, tile_count=3
    )
    assert batch.to(torch.device("cpu")).num_tiles == 3
    with pytest.raises(ValueError, match="tile_count"):
        Batch(tokens=tokens, labels=tokens, loss_mask=torch.ones(1, 4), position_ids=tokens, pixel_values=None)


@pytest.mark.parametrize("first_stage", [True, False])
def test_build_loader_decodes_only_on_the_first_pipeline_stage(monkeypatch, first_stage):
    from megatron.core import parallel_state

    import sail_megatron.data.loader as loader_module

    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda: 0)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: 1)
    monkeypatch.setattr(parallel_state, "is_pipeline_first_stage", lambda ignore_virtual=False: first_stage)
    monkeypatch.setattr(loader_module, "build_train_loader", lambda *a, **k: [_packed_raw()])
    cfg = SimpleNamespace(
        model=SimpleNamespace(vision=SimpleNamespace(image_size=TILE), tokens_per_tile=PER_TILE),
        data=SimpleNamespace(decoder="pil", max_pixels=DEFAULT_MAX_PIXELS),
        run=SimpleNamespace(seed=0),
        parallel=SimpleNamespace(vision_parallel="tensor", tensor_model_parallel_size=1),
    )
    tokenizer = SimpleNamespace(ids=SimpleNamespace(img_context=IMG))
    _, materialize = build_loader(cfg, tokenizer, torch.device("cpu"))
    assert materialize.decode_images is first_stage


class RecordingDecoder(CountingDecoder):
    def __call__(self, images, plans, tile_size):
        self.seen = list(images)
        return super().__call__(images, plans, tile_size)


def test_each_tensor_parallel_rank_decodes_only_its_share_of_the_images():
    """parallel.vision_parallel=data: the 3-tile image goes to one rank, the 1-tile image to the other;
    both ranks know the whole micro-batch's tiles and images, and the share."""
    batches, seen = [], []
    for rank in range(2):
        decoder = RecordingDecoder()
        materialize = BatchMaterializer(decoder, TILE, torch.device("cpu"), PER_TILE, IMG, vision_rank=(rank, 2))
        batches.append(materialize(_packed_raw()))
        seen.append(decoder.seen)
    assert seen == [[b"first"], [b"second"]]
    assert [b.pixel_values.shape[0] for b in batches] == [3, 1] and [b.decoded_images for b in batches] == [1, 1]
    for b in batches:
        assert b.num_tiles == 4 and b.image_count == 2 and b.vision_share.owners == (0, 1)
