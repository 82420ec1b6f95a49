"""`data.max_pixels` holds where pixels are decoded too, not only where headers are read: the PIL path
and DALI's reference fallback (images DALI would decode differently) use the configured limit."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sail_megatron.data.decode import build_tile_decoder
from sail_megatron.data.image_io import ImageError
from sail_megatron.data.tiling import TilePlan


def _image(fmt: str, mode: str) -> bytes:  # 300 x 200 = 60,000 pixels
    out = io.BytesIO()
    Image.fromarray(np.full((200, 300, len(mode)), 128, np.uint8), mode).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("kind,fmt,mode", [("pil", "JPEG", "RGB"), ("dali", "PNG", "RGBA")])
def test_decoders_apply_the_configured_limit(kind, fmt, mode):
    plan = TilePlan(cols=1, rows=1, thumbnail=False)
    tiles = build_tile_decoder(kind, torch.device("cpu"), max_pixels=60_000)([_image(fmt, mode)], [plan], 56)
    assert tiles.shape[0] == 1
    with pytest.raises(ImageError, match="exceeds"):
        build_tile_decoder(kind, torch.device("cpu"), max_pixels=50_000)([_image(fmt, mode)], [plan], 56)
