"""tiles_from_grid / normalize_hwc: Triton (interpreter on CPU, compiled on CUDA) against the PyTorch reference."""

import pytest
import torch

from sail_megatron.kernels.tile_normalize import (
    normalize_hwc,
    normalize_hwc_reference,
    tiles_from_grid,
    tiles_from_grid_reference,
)

# The kernel computes x*scale + shift (one fma) where the reference computes (x/255 - mean)/std: a few fp32
# ulps apart. Outputs lie in about [-2.12, 2.64] and never within 4e-3 of zero (the means are not byte
# multiples of 1/255), so fp32 gets an absolute bound of 4 ulps at |x| < 4 (2**-20); bf16/fp16 may round the
# other way at most once: 1 ulp relative (2**-7 / 2**-10), plus a hair for the fp32 part.
TOL = {
    torch.float32: dict(atol=2.0**-20, rtol=0.0),
    torch.bfloat16: dict(atol=1e-6, rtol=2.0**-7),
    torch.float16: dict(atol=1e-6, rtol=2.0**-10),
}
DTYPES = list(TOL)


def _image(h, w, device, channels=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w, channels), generator=gen, dtype=torch.uint8).to(device)


def _assert_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOL[expected.dtype])


@pytest.mark.parametrize(
    "rows, cols, size", [(1, 1, 1), (1, 1, 5), (2, 3, 8), (3, 1, 7), (1, 2, 33)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiles_from_grid_matches_reference(rows, cols, size, dtype, device):
    image = _image(rows * size, cols * size, device)
    out = tiles_from_grid(image, rows, cols, size, dtype=dtype, impl="triton")
    _assert_close(out, tiles_from_grid_reference(image, rows, cols, size, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_byte_value(dtype, device):
    # All 256 values in every channel, channels shifted so each sees every byte in each position.
    v = torch.arange(256, dtype=torch.uint8)
    image = torch.stack([v, v.roll(85), v.roll(170)], -1).view(16, 16, 3).to(device)
    tiles = image[None]
    _assert_close(normalize_hwc(tiles, dtype=dtype, impl="triton"), normalize_hwc_reference(tiles, dtype=dtype))


def test_tile_order_is_row_major(device):
    # A constant image per tile: tile k must come from grid row k // cols, column k % cols.
    rows, cols, s = 2, 3, 4
    ids = torch.arange(rows * cols, dtype=torch.uint8).view(rows, 1, cols, 1).expand(rows, s, cols, s)
    image = ids.reshape(rows * s, cols * s, 1).expand(-1, -1, 3).contiguous().to(device)
    out = tiles_from_grid(image, rows, cols, s, mean=(0, 0, 0), std=(1 / 255,) * 3, impl="triton")
    assert out[:, :, 0, 0].tolist() == [[float(k)] * 3 for k in range(rows * cols)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_and_custom_stats(dtype, device):
    stats = dict(mean=(0.5, 0.25, 0.125), std=(0.5, 0.3, 0.7))
    rgba = _image(2 * 6, 3 * 6, device, channels=4)
    image = rgba[..., :3]  # channel stride 1, pixel stride 4
    _assert_close(
        tiles_from_grid(image, 2, 3, 6, dtype=dtype, impl="triton", **stats),
        tiles_from_grid_reference(image, 2, 3, 6, dtype=dtype, **stats),
    )
    tiles = _image(6, 6, device)[None].expand(3, 6, 6, 3)  # stride 0 over tiles
    _assert_close(
        normalize_hwc(tiles, dtype=dtype, impl="triton", **stats), normalize_hwc_reference(tiles, dtype=dtype, **stats)
    )


@pytest.mark.parametrize("n, size", [(1, 1), (3, 9), (2, 33)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalize_hwc_matches_reference(n, size, dtype, device):
    tiles = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8).to(device)
    _assert_close(normalize_hwc(tiles, dtype=dtype, impl="triton"), normalize_hwc_reference(tiles, dtype=dtype))


def test_errors():
    image = torch.zeros(8, 12, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs an image of shape \\(8, 12, 3\\)"):
        tiles_from_grid(image[:, :10], 2, 3, 4)
    with pytest.raises(ValueError, match="needs an image of shape"):
        tiles_from_grid(image, 2, 2, 4)
    with pytest.raises(ValueError, match="uint8"):
        tiles_from_grid(image.float(), 2, 3, 4)
    with pytest.raises(ValueError, match="dtype must be one of"):
        tiles_from_grid(image, 2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="3 values"):
        tiles_from_grid(image, 2, 3, 4, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="non-zero"):
        tiles_from_grid(image, 2, 3, 4, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match=">= 1"):
        tiles_from_grid(image, 0, 3, 4)
    with pytest.raises(ValueError, match="\\[n, S, S, 3\\]"):
        normalize_hwc(torch.zeros(2, 4, 5, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="\\[n, S, S, 3\\]"):
        normalize_hwc(torch.zeros(2, 4, 4, 4, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_matches_reference_at_real_sizes(dtype):
    image = _image(2 * 448, 3 * 448, "cuda")
    _assert_close(
        tiles_from_grid(image, 2, 3, 448, dtype=dtype),  # auto: compiled Triton on CUDA
        tiles_from_grid_reference(image, 2, 3, 448, dtype=dtype),
    )
    tiles = torch.randint(0, 256, (12, 448, 448, 3), dtype=torch.uint8, device="cuda")
    _assert_close(normalize_hwc(tiles, dtype=dtype), normalize_hwc_reference(tiles, dtype=dtype))
