import io

import numpy as np
import pytest
import torch
from PIL import Image

from sail_megatron.data.decode_pil import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PilTileDecoder,
    cut_tiles,
    normalize_tiles,
)
from sail_megatron.data.image_io import decode_rgb
from sail_megatron.data.tiling import TilePlan, plan_tiles

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def internvl_tiles(image: Image.Image, plan: TilePlan, s: int) -> torch.Tensor:
    """InternVL's way: resize, one PIL crop per tile, then a ToTensor-like HWC -> CHW conversion."""
    target_width, target_height = s * plan.cols, s * plan.rows
    resized = image.resize((target_width, target_height), Image.Resampling.BICUBIC)
    crops = []
    for i in range(plan.cols * plan.rows):
        box = (
            (i % (target_width // s)) * s,
            (i // (target_width // s)) * s,
            ((i % (target_width // s)) + 1) * s,
            ((i // (target_width // s)) + 1) * s,
        )
        crops.append(resized.crop(box))
    if plan.thumbnail:
        crops.append(image.resize((s, s), Image.Resampling.BICUBIC))
    return torch.stack([torch.from_numpy(np.array(c)).permute(2, 0, 1) for c in crops])


def test_shapes_and_row_major_order():
    s, cols, rows = 16, 3, 2
    block = 40  # source blocks larger than tiles, so the resize really resamples
    image = Image.new("RGB", (cols * block, rows * block))
    for k, colour in enumerate(COLOURS):
        x, y = (k % cols) * block, (k // cols) * block
        image.paste(colour, (x, y, x + block, y + block))

    tiles = cut_tiles(image, TilePlan(cols, rows, thumbnail=True), s)
    assert tiles.dtype == torch.uint8 and tiles.shape == (cols * rows + 1, 3, s, s)
    for k, colour in enumerate(COLOURS):
        assert tiles[k, :, s // 2, s // 2].tolist() == list(colour), k
    thumb = tiles[-1]
    expected = np.asarray(image.resize((s, s), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(thumb.numpy(), expected)
    assert thumb[:, 0, 0].tolist() == list(COLOURS[0]) and thumb[:, -1, -1].tolist() == list(COLOURS[5])

    assert cut_tiles(image, TilePlan(cols, rows, thumbnail=False), s).shape == (cols * rows, 3, s, s)


@pytest.mark.parametrize(
    "size,plan,s",
    [
        ((333, 517), TilePlan(1, 2, True), 64),
        ((1000, 200), TilePlan(5, 1, True), 32),
        ((50, 50), TilePlan(1, 1, False), 64),
        ((777, 555), TilePlan(3, 2, False), 28),
        ((900, 600), plan_tiles(900, 600, 1, 6, 448, True), 448),
    ],
)
def test_bit_identical_to_per_tile_crops(size, plan, s):
    image = noise(*size)
    assert torch.equal(cut_tiles(image, plan, s), internvl_tiles(image, plan, s))


def test_cut_tiles_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        cut_tiles(Image.new("L", (8, 8)), TilePlan(1, 1, False), 8)


def test_normalize_against_formula():
    tiles = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (tiles.double() / 255 - mean) / std
    out = normalize_tiles(tiles)
    assert out.dtype == torch.float32 and out.shape == tiles.shape
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    # torchvision's ToTensor + Normalize op order, in float32: bit-identical.
    mean32, std32 = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    tv = (tiles.float() / 255 - mean32) / std32
    assert torch.equal(out, tv)
    assert torch.equal(normalize_tiles(tiles, torch.bfloat16), out.to(torch.bfloat16))


def test_normalize_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        normalize_tiles(torch.zeros(1, 3, 4, 4))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_pil_tile_decoder():
    images = [noise(300, 100, seed=1), noise(64, 64, seed=2), noise(100, 250, seed=3)]
    s = 32
    plans = [plan_tiles(*im.size, 1, 6, s, True) for im in images]
    data = [png(im) for im in images]
    out = PilTileDecoder()(data, plans, s)
    assert out.dtype == torch.float32 and out.shape == (sum(p.num_tiles for p in plans), 3, s, s)
    expected = torch.cat([normalize_tiles(cut_tiles(decode_rgb(d), p, s)) for d, p in zip(data, plans)])
    assert torch.equal(out, expected)

    assert PilTileDecoder(dtype=torch.bfloat16)(data, plans, s).dtype == torch.bfloat16
    assert PilTileDecoder()([], [], s).shape == (0, 3, s, s)
    with pytest.raises(ValueError, match="plans"):
        PilTileDecoder()(data, plans[:2], s)
