"""The DALI decoder's pipeline over a run: built a logarithmic number of times as batches grow, shut
down when replaced, and dropped after a DALI error while the batch still decodes (real DALI, CPU backend)."""

import io
import logging

import pytest
import torch
from PIL import Image

from sail_megatron.data.decode import BatchMaterializer
from sail_megatron.data.decode_pil import PilTileDecoder
from sail_megatron.data.image_io import ImageError, read_image_size
from sail_megatron.data.task_encoder import RawBatch
from sail_megatron.data.tiling import plan_tiles

pytest.importorskip("nvidia.dali")
skdata = pytest.importorskip("skimage.data")

from sail_megatron.data.decode_dali import DaliTileDecoder, pipeline_capacity  # noqa: E402

TILE = 112
LEVEL = 1 / 255 / 0.225  # one uint8 level after ImageNet normalization (std ~0.225)


def _jpeg(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _corrupt(jpeg: bytes) -> bytes:
    """Pixel data no decoder accepts behind a header that parses: the scan names a component the
    frame does not have."""
    sos = jpeg.index(b"\xff\xda")
    data = bytearray(jpeg)
    data[sos + 5] = 0x77  # first component selector of the scan
    return bytes(data)


@pytest.fixture(scope="module")
def photos():
    return [_jpeg(skdata.astronaut()), _jpeg(skdata.chelsea()), _jpeg(skdata.coffee())]


def _plans(images):
    return [plan_tiles(*Image.open(io.BytesIO(b)).size, 1, 4, TILE, True) for b in images]


def assert_matches_reference(tiles, images):
    """Within test_decode_dali.py's DALI-vs-PIL bounds."""
    ref = PilTileDecoder()(images, _plans(images), TILE)
    assert tiles.shape == ref.shape
    diff = (tiles - ref).abs() / LEVEL
    assert diff.mean() < 0.4
    assert torch.quantile(diff.flatten()[::97], 0.99) <= 2.5
    assert diff.max() < 32


class ShutdownLog:
    """Wraps the decoder's pipeline builder to record every pipeline and whether it was shut down."""

    def __init__(self, decoder: DaliTileDecoder):
        self.pipes, self.shut = [], []
        build = decoder._build

        def recording_build(batch_size, tile_size):
            pipe = build(batch_size, tile_size)
            index, shutdown = len(self.pipes), pipe._shutdown

            def recorded_shutdown():
                self.shut.append(index)
                shutdown()

            pipe._shutdown = recorded_shutdown
            self.pipes.append(pipe)
            return pipe

        decoder._build = recording_build


def test_capacity_grows_by_powers_of_two():
    assert [pipeline_capacity(n) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]
    assert pipeline_capacity(3, current=64) == 64


def test_growing_batches_build_the_pipeline_a_logarithmic_number_of_times():
    small = _jpeg(skdata.astronaut()[::8, ::8].copy())  # 64 x 64: keeps 40 batches quick
    decoder = DaliTileDecoder(torch.device("cpu"))
    log = ShutdownLog(decoder)
    for n in range(1, 41):
        images = [small] * n
        out = decoder(images, _plans(images), TILE)
        assert out.shape[0] == sum(p.num_tiles for p in _plans(images))
    assert decoder.pipelines_built == 4  # batch sizes 8, 16, 32, 64
    assert [p.max_batch_size for p in log.pipes] == [8, 16, 32, 64]
    assert log.shut == [0, 1, 2], "each replaced pipeline is shut down when replaced"


def test_corrupt_image_drops_the_pipeline_and_later_batches_still_match_pil(photos):
    bad = _corrupt(photos[0])
    assert read_image_size(bad) == Image.open(io.BytesIO(photos[0])).size, "the header still parses"
    decoder = DaliTileDecoder(torch.device("cpu"))
    log = ShutdownLog(decoder)
    assert_matches_reference(decoder(photos, _plans(photos), TILE), photos)
    with pytest.raises(ImageError, match="truncated"):  # the bad image's own error, from the reference
        decoder([photos[1], bad, photos[2]], _plans([photos[1], bad, photos[2]]), TILE)
    assert log.shut == [0], "the pipeline that failed is not reused"
    for batch in (photos, photos[::-1], photos[1:]):
        assert_matches_reference(decoder(batch, _plans(batch), TILE), batch)
    assert decoder.pipelines_built == 2


def test_materializer_keeps_the_good_images_of_a_batch_with_a_corrupt_one(photos, caplog):
    images = [photos[0], _corrupt(photos[1]), photos[2]]
    plans = _plans(images)
    raw = RawBatch(
        keys=["a", "b", "c"],
        tokens=torch.zeros(3, 8, dtype=torch.long),
        labels=torch.zeros(3, 8, dtype=torch.long),
        loss_mask=torch.ones(3, 8),
        position_ids=torch.zeros(3, 8, dtype=torch.long),
        images=images,
        plans=plans,
        image_sample=[0, 1, 2],
        spans=[(0, 0, 8), (1, 0, 8), (2, 0, 8)],
    )
    materialize = BatchMaterializer(DaliTileDecoder(torch.device("cpu")), TILE, torch.device("cpu"))
    caplog.set_level(logging.WARNING)
    batch = materialize(raw)
    n0, n1 = plans[0].num_tiles, plans[1].num_tiles
    assert_matches_reference(batch.pixel_values[:n0], images[:1])
    assert batch.pixel_values[n0 : n0 + n1].eq(0).all()
    assert_matches_reference(batch.pixel_values[n0 + n1 :], images[2:])
    assert batch.loss_mask.sum(1).tolist() == [8, 0, 8]
    assert materialize.skipped == {"decode_failed": 1}
    assert any("sample b failed to decode" in r.message for r in caplog.records)
    later = materialize(
        RawBatch(
            keys=["d"],
            tokens=torch.zeros(1, 8, dtype=torch.long),
            labels=torch.zeros(1, 8, dtype=torch.long),
            loss_mask=torch.ones(1, 8),
            position_ids=torch.zeros(1, 8, dtype=torch.long),
            images=photos,
            plans=_plans(photos),
            image_sample=[0, 0, 0],
            spans=[(0, 0, 8)],
        )
    )
    assert_matches_reference(later.pixel_values, photos)
    assert materialize.skipped == {"decode_failed": 1}


class FailingPipe:
    def feed_input(self, name, data):
        pass

    def run(self):
        raise RuntimeError("Critical error in pipeline:\nFailed to decode sample #0 : device lost")

    def _shutdown(self):
        pass


def test_a_failing_pipeline_falls_back_to_the_reference_for_the_whole_batch(photos, caplog):
    decoder = DaliTileDecoder(torch.device("cpu"))
    build = decoder._build
    decoder._build = lambda batch_size, tile_size: FailingPipe()
    caplog.set_level(logging.WARNING, logger="sail_megatron.data.decode_dali")
    out = decoder(photos, _plans(photos), TILE)
    assert torch.equal(out, PilTileDecoder()(photos, _plans(photos), TILE))
    assert any("Failed to decode sample #0" in r.message for r in caplog.records)
    decoder._build = build
    assert_matches_reference(decoder(photos, _plans(photos), TILE), photos)
    assert decoder.pipelines_built == 2
