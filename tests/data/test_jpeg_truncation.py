"""A JPEG cut short and closed with an EOI marker: libjpeg only warns and greys out the rest, so the
full decode must notice that the scan data ended early (prepare --verify-decode and training alike)."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sail_megatron.data.decode import BatchMaterializer, build_tile_decoder
from sail_megatron.data.image_io import ImageError, decode_rgb, read_image_size
from sail_megatron.data.prepare import prepare
from sail_megatron.data.task_encoder import RawBatch
from sail_megatron.data.tiling import TilePlan
from tests.data.prepare_inputs import llava, photo_jpeg, truncated_with_eoi, write_jsonl

VARIANTS = {
    "baseline": {},
    "progressive": {"progressive": True},
    "optimized_restarts": {"optimize": True, "restart_marker_blocks": 2},
    "no_subsampling": {"subsampling": 0, "quality": 100},
}


def _gray_jpeg() -> bytes:
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.camera()).save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_complete_photos_decode_as_pil_does(variant):
    data = photo_jpeg(**VARIANTS[variant])
    with Image.open(io.BytesIO(data)) as im:
        expected = im.convert("RGB").tobytes()
    assert decode_rgb(data).tobytes() == expected


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.9])
def test_truncated_photo_closed_with_eoi_is_truncated(variant, keep):
    data = truncated_with_eoi(photo_jpeg(**VARIANTS[variant]), keep)
    assert read_image_size(data) == (512, 512), "the header alone cannot tell"
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # what PIL alone does: no error, the rest of the image is grey
    with pytest.raises(ImageError) as info:
        decode_rgb(data)
    assert info.value.reason == "truncated"


def test_grayscale_and_cmyk():
    gray = _gray_jpeg()
    assert np.array_equal(np.asarray(decode_rgb(gray))[..., 0], np.asarray(Image.open(io.BytesIO(gray))))
    with pytest.raises(ImageError, match="truncated"):
        decode_rgb(truncated_with_eoi(gray))
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg())).convert("CMYK").save(buf, "JPEG", quality=90)
    assert decode_rgb(buf.getvalue()).size == (512, 512)
    with pytest.raises(ImageError, match="truncated"):
        decode_rgb(truncated_with_eoi(buf.getvalue()))


def test_prepare_verify_decode_skips_it(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(photo_jpeg())
    (images / "cut.jpg").write_bytes(truncated_with_eoi(photo_jpeg()))
    src = write_jsonl(tmp_path / "in.jsonl", [llava("ok", "ok.jpg"), llava("cut", "cut.jpg")])
    report = prepare(src, images, tmp_path / "out", verify_decode=True, progress=False)
    assert report.written == 1
    assert [(s.id, s.reason) for s in report.skipped] == [("cut", "image_truncated")]


def test_training_decode_counts_and_names_the_sample(caplog):
    good, cut = photo_jpeg(), truncated_with_eoi(photo_jpeg())
    plan = TilePlan(1, 1, False)
    raw = RawBatch(
        keys=["ds/shard-000000.tar/000000001", "ds/shard-000000.tar/000000002"],
        tokens=torch.zeros(2, 8, dtype=torch.long),
        labels=torch.zeros(2, 8, dtype=torch.long),
        loss_mask=torch.ones(2, 8),
        position_ids=torch.zeros(2, 8, dtype=torch.long),
        images=[good, cut],
        plans=[plan, plan],
        image_sample=[0, 1],
        spans=[(0, 0, 8), (1, 0, 8)],
    )
    materialize = BatchMaterializer(build_tile_decoder("pil", torch.device("cpu")), 28, torch.device("cpu"))
    caplog.set_level(logging.WARNING, logger="sail_megatron.data.decode")
    batch = materialize(raw)
    assert materialize.skipped == {"decode_failed": 1}
    assert batch.loss_mask[0].sum() == 8 and batch.loss_mask[1].sum() == 0
    assert any("000000002" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
