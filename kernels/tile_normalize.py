"""uint8 HWC pixels -> normalised CHW tiles for the ViT, in one pass (what DALI's decoder output needs).

tiles_from_grid cuts a resized [rows*S, cols*S, 3] image into rows*cols tiles, row-major (tile k is grid row
k // cols, column k % cols); normalize_hwc does the same for tiles already cut, [n, S, S, 3]. Both compute
(x/255 - mean)/std. The kernel folds that into one fma, x*scale + shift with scale = 1/(255*std) and
shift = -mean/std, so it differs from the reference by a few fp32 ulps (at most 1 ulp after a bf16/fp16 cast).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from sail_megatron.kernels._common import Impl, cast_rne, use_triton

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
OUT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def normalize_hwc_reference(
    tiles: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[n, S, S, 3] uint8 -> [n, 3, S, S] ((x/255 - mean)/std) in fp32, then cast to dtype."""
    m = torch.tensor(mean, dtype=torch.float32, device=tiles.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=tiles.device).view(1, 3, 1, 1)
    return ((tiles.permute(0, 3, 1, 2).float() / 255 - m) / s).to(dtype)


def tiles_from_grid_reference(
    image: torch.Tensor,
    rows: int,
    cols: int,
    tile_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[rows*S, cols*S, 3] uint8 -> [rows*cols, 3, S, S]: cut row-major, then normalise."""
    s = tile_size
    tiles = image.reshape(rows, s, cols, s, 3).permute(0, 2, 1, 3, 4).reshape(rows * cols, s, s, 3)
    return normalize_hwc_reference(tiles, mean, std, dtype)


@triton.jit
def _normalize_tiles_kernel(
    img_ptr,
    out_ptr,
    cols,
    tile_row_stride,
    tile_col_stride,
    s_y,
    s_x,
    s_c,
    S,
    scale0,
    scale1,
    scale2,
    shift0,
    shift1,
    shift2,
    BLOCK: tl.constexpr,
):
    # Program (k, p): BLOCK pixels of tile k; reads the 3 interleaved bytes, writes the 3 planes.
    k = tl.program_id(0)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = p < S * S
    y = p // S
    x = p % S
    base = (k // cols).to(tl.int64) * tile_row_stride + (k % cols).to(tl.int64) * tile_col_stride
    src = img_ptr + base + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x
    dst = out_ptr + k.to(tl.int64) * 3 * S * S + p
    dtype = out_ptr.dtype.element_ty
    v = tl.load(src, mask=ok).to(tl.float32)
    tl.store(dst, cast_rne(v * scale0 + shift0, dtype), mask=ok)
    v = tl.load(src + s_c, mask=ok).to(tl.float32)
    tl.store(dst + S * S, cast_rne(v * scale1 + shift1, dtype), mask=ok)
    v = tl.load(src + 2 * s_c, mask=ok).to(tl.float32)
    tl.store(dst + 2 * S * S, cast_rne(v * scale2 + shift2, dtype), mask=ok)


def _launch(
    src: torch.Tensor,
    n_tiles: int,
    cols: int,
    tile_row_stride: int,
    tile_col_stride: int,
    s_y: int,
    s_x: int,
    s_c: int,
    tile_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype,
) -> torch.Tensor:
    out = torch.empty((n_tiles, 3, tile_size, tile_size), dtype=dtype, device=src.device)
    if n_tiles and tile_size:
        # Fold in double precision, hand over as fp32 scalars.
        scale = [1.0 / (255.0 * float(sd)) for sd in std]
        shift = [-float(mu) / float(sd) for mu, sd in zip(mean, std)]
        block = min(1024, triton.next_power_of_2(tile_size * tile_size))
        grid = (n_tiles, triton.cdiv(tile_size * tile_size, block))
        _normalize_tiles_kernel[grid](
            src, out, cols, tile_row_stride, tile_col_stride, s_y, s_x, s_c, tile_size, *scale, *shift, BLOCK=block
        )
    return out


def _check_common(name: str, x: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype) -> None:
    if x.dtype != torch.uint8:
        raise ValueError(f"{name}: pixels must be uint8, got {x.dtype}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{name}: mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
    if any(float(sd) == 0 for sd in std):
        raise ValueError(f"{name}: std must be non-zero, got {tuple(std)}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"{name}: dtype must be one of {OUT_DTYPES}, got {dtype}")


def tiles_from_grid(
    image: torch.Tensor,
    rows: int,
    cols: int,
    tile_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    impl: Impl = "auto",
) -> torch.Tensor:
    """image [rows*S, cols*S, 3] uint8 (HWC) -> [rows*cols, 3, S, S] normalised tiles of dtype."""
    _check_common("tiles_from_grid", image, mean, std, dtype)
    if rows < 1 or cols < 1 or tile_size < 1:
        raise ValueError(f"tiles_from_grid: rows, cols, tile_size must be >= 1, got {rows}, {cols}, {tile_size}")
    expected = (rows * tile_size, cols * tile_size, 3)
    if tuple(image.shape) != expected:
        raise ValueError(
            f"tiles_from_grid: a {rows}x{cols} grid of {tile_size}px tiles needs an image of shape "
            f"{expected} (HWC), got {tuple(image.shape)}"
        )
    if not use_triton(impl, _normalize_tiles_kernel, image):
        return tiles_from_grid_reference(image, rows, cols, tile_size, mean, std, dtype)
    s_h, s_w, s_c = image.stride()
    return _launch(
        image, rows * cols, cols, tile_size * s_h, tile_size * s_w, s_h, s_w, s_c, tile_size, mean, std, dtype
    )


def normalize_hwc(
    tiles: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    impl: Impl = "auto",
) -> torch.Tensor:
    """tiles [n, S, S, 3] uint8 (HWC) -> [n, 3, S, S] normalised, of dtype."""
    _check_common("normalize_hwc", tiles, mean, std, dtype)
    if tiles.dim() != 4 or tiles.shape[3] != 3 or tiles.shape[1] != tiles.shape[2]:
        raise ValueError(f"normalize_hwc: tiles must be [n, S, S, 3] (square, HWC), got {tuple(tiles.shape)}")
    if not use_triton(impl, _normalize_tiles_kernel, tiles):
        return normalize_hwc_reference(tiles, mean, std, dtype)
    s_n, s_h, s_w, s_c = tiles.stride()
    # The grid kernel with one column: tile k starts at k * s_n.
    return _launch(tiles, tiles.shape[0], 1, s_n, 0, s_h, s_w, s_c, tiles.shape[1], mean, std, dtype)
