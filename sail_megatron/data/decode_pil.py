"""The PIL tile path: bytes -> RGB -> InternVL tiles -> normalized float tensor.

Pixel-identical to InternVL's `dynamic_preprocess` + ToTensor + Normalize, but the grid is cut
with one numpy reshape instead of a PIL crop per tile. It is the reference a DALI decoder matches.
"""

import numpy as np
import torch
from PIL import Image

from sail_megatron.config.data import DEFAULT_MAX_PIXELS
from sail_megatron.data.image_io import decode_rgb
from sail_megatron.data.tiling import TilePlan
from sail_megatron.kernels.tile_normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_hwc_reference  # noqa: F401


def cut_tiles(image: Image.Image, plan: TilePlan, tile_size: int) -> torch.Tensor:
    """uint8 [plan.num_tiles, 3, S, S]: grid tiles row-major (tile k = column k % cols, row k // cols),
    then the whole-image thumbnail if the plan has one."""
    if image.mode != "RGB":
        raise ValueError(f"image must be RGB, got mode {image.mode}")
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    s, cols, rows = tile_size, plan.cols, plan.rows
    out = np.empty((plan.num_tiles, 3, s, s), dtype=np.uint8)  # writable, so torch shares it as is
    grid = np.asarray(image.resize((cols * s, rows * s), Image.Resampling.BICUBIC))
    # [rows*S, cols*S, 3] -> [rows, S, cols, S, 3] -> [rows, cols, 3, S, S]: crops are plain copies.
    out[: cols * rows] = grid.reshape(rows, s, cols, s, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, s, s)
    if plan.thumbnail:
        out[-1] = np.asarray(image.resize((s, s), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    return torch.from_numpy(out)


def normalize_tiles(tiles_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(x / 255 - mean) / std per channel on [N, 3, S, S].

    Computed in float32 with torchvision's op order (ToTensor, then Normalize) so the values are
    bit-identical to InternVL's transform; cast to `dtype` last.
    """
    if tiles_uint8.dtype != torch.uint8 or tiles_uint8.dim() != 4 or tiles_uint8.shape[1] != 3:
        raise ValueError(f"expected uint8 [N, 3, S, S], got {tiles_uint8.dtype} {tuple(tiles_uint8.shape)}")
    # One normalization for the whole project: the tile kernel's PyTorch reference (same op order).
    return normalize_hwc_reference(tiles_uint8.permute(0, 2, 3, 1), dtype=dtype)


class PilTileDecoder:
    """Decodes a batch of encoded images into normalized tiles, concatenated in image order.

    The call signature is the tile-decoder interface; a DALI (GPU) decoder implements the same one.
    """

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, dtype: torch.dtype = torch.float32) -> None:
        self.max_pixels = max_pixels
        self.dtype = dtype

    def __call__(self, images: list[bytes], plans: list[TilePlan], tile_size: int) -> torch.Tensor:
        if len(images) != len(plans):
            raise ValueError(f"got {len(images)} images but {len(plans)} plans")
        if not images:
            return torch.empty((0, 3, tile_size, tile_size), dtype=self.dtype)
        tiles = [cut_tiles(decode_rgb(data, self.max_pixels), plan, tile_size) for data, plan in zip(images, plans)]
        return normalize_tiles(torch.cat(tiles), self.dtype)
