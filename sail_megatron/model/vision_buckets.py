"""How the ViT is called on a micro-batch's tiles: at their own count, or padded to a static tile bucket.

SAIL-VL's tiles are all 448 x 448, so the ViT's input shapes differ only in the tile count. With
`precision.vision_tile_buckets` every call is padded up to the smallest bucket that holds it, with blank
(zero) tiles whose features are dropped before the projector, so the ViT runs at a few shapes only (what
CUDA graphs need: `model/vision_graphs.py`). Padding changes no result: tiles are independent sequences
(each attends within itself; norms and MLPs act per token), and the dropped features get zero gradients.
Under FP8 the tile layout (`model/tile_layout.py`) meets the GEMM token rule for any tile count, buckets
included. Drop path draws once per tile, blank tiles too, so it draws other numbers than an unpadded call
(from the same distribution).

The runner is chosen once, when the model is built (`model/build.py: tile_runner`); the model only calls it.
"""

import bisect
from typing import Optional, Sequence

import torch


def vision_trains(vision: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in vision.parameters())


class DynamicTiles:
    """Every call at its own tile count (the default). A frozen ViT runs without autograd."""

    buckets: Optional[Sequence[int]] = None

    def __call__(self, vision: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trains(vision)):
            return vision(pixel_values)


def pad_tiles(pixel_values: torch.Tensor, tiles: int) -> torch.Tensor:
    """[T, 3, S, S] followed by blank (zero) tiles up to `tiles`."""
    extra = tiles - pixel_values.shape[0]
    if not extra:
        return pixel_values
    return torch.cat([pixel_values, pixel_values.new_zeros(extra, *pixel_values.shape[1:])])


def bucket_of(buckets: Sequence[int], tiles: int) -> int:
    """The smallest bucket of at least `tiles` tiles."""
    i = bisect.bisect_left(buckets, tiles)
    if i == len(buckets):
        raise ValueError(
            f"{tiles} tiles exceed the largest tile bucket ({buckets[-1]}): "
            "precision.vision_tile_buckets must reach data.max_tiles_per_pack"
        )
    return buckets[i]


def vit_call_tiles(buckets: Optional[Sequence[int]], tiles: int) -> int:
    """Tiles the ViT runs for a micro-batch bringing `tiles` of its own: none brings the one blank tile
    (every rank runs the vision side, so its gradients and reductions match), then up to the bucket."""
    tiles = max(tiles, 1)
    return tiles if buckets is None else bucket_of(buckets, tiles)


class BucketedTiles(DynamicTiles):
    """Every call padded up to the smallest tile bucket that holds it; the blank tiles' features dropped."""

    def __init__(self, buckets: Sequence[int]):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"tile buckets must be ascending positive counts, got {buckets!r}")
        self.buckets = tuple(buckets)

    def bucket(self, tiles: int) -> int:
        return bucket_of(self.buckets, tiles)

    def __call__(self, vision: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        tiles = pixel_values.shape[0]
        features = super().__call__(vision, pad_tiles(pixel_values, self.bucket(tiles)))
        return features[:tiles]
