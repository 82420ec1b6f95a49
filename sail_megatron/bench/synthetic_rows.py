"""Synthetic micro-batches shaped like a real VLM stream, for throughput only (nothing to learn), and the
two synthetic sample distributions the packing tests, benchmarks and `sail-bench plan` share.

Samples have random lengths with one image block of 1..max_tiles tiles inside them; packed rows are
filled to seq_length in THD form (as the packer does with real data), padded rows hold one sample
each. Pixels are generated on the device: the benchmark measures training, not a host RNG.

The distributions (token and tile counts per sample, no content), 256 language tokens per 448 px tile
as in SAIL-VL unless told otherwise:

* SFT-like (`sft_like`): 40% text-only, lognormal length (median 300, sigma 0.9) clipped to 50-3000
  tokens; 40% single-image, InternVL tiling with up to 6 tiles (grid 1-6, uniform) plus a thumbnail
  when the grid has more than one tile, so 1, 3, 4, 5, 6 or 7 tiles, plus lognormal text (median 250,
  sigma 0.8, clipped 20-1500); 20% multi-image, 2-4 images where each image gets InternVL's
  multi-image share max(1, 6 // images) of grid tiles (plus thumbnail), so 4-9 tiles per sample,
  plus text as for single images. Every image adds 2 tokens (<img>, </img>).
* Caption-like (`caption_like`): every sample one image of 1-7 tiles as above plus a caption,
  lognormal (median 40, sigma 0.6) clipped to 5-200 tokens.
"""

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from sail_megatron.data.batch import Batch
from sail_megatron.data.vision_share import VisionShare
from sail_megatron.training.metered_data import vision_rank

FIRST_TEXT_ID = 16


@dataclass
class SyntheticRowsConfig:
    seq_length: int
    packed: bool
    tile_size: int
    tokens_per_tile: int
    vocab_size: int
    image_token_id: int
    max_tiles_per_sample: int = 7
    """6 tiles + thumbnail: SAIL-VL's max_num=6."""
    max_tiles_per_pack: int = 40
    min_sample_tokens: int = 512
    """Sample lengths are uniform in [min, max] (tokens, image tokens included)."""
    max_sample_tokens: int = 2048
    seed: int = 0
    vision_rank: Optional[Tuple[int, int]] = None
    """(rank, ranks) under parallel.vision_parallel=data: each row's pixels are this rank's share only."""


def rows_config(cfg, seed: int) -> SyntheticRowsConfig:
    """Rows shaped by a recipe (a TrainConfig): its row length, packing, tile budget and tiles per image;
    samples of 1/8 to 1/2 row (512-2048 tokens at 4096), so several per packed row."""
    model = cfg.model
    return SyntheticRowsConfig(
        seq_length=cfg.data.seq_length,
        packed=cfg.data.packing,
        tile_size=model.vision.image_size,
        tokens_per_tile=model.tokens_per_tile,
        vocab_size=model.language.vocab_size,
        image_token_id=model.image_context_token_id,
        max_tiles_per_pack=cfg.data.max_tiles_per_pack,
        max_tiles_per_sample=cfg.data.max_tiles + int(cfg.data.use_thumbnail),
        seed=seed,
        min_sample_tokens=max(cfg.data.seq_length // 8, 32),
        max_sample_tokens=cfg.data.seq_length // 2,
        vision_rank=vision_rank(cfg.parallel),
    )


class SyntheticRows:
    def __init__(self, cfg: SyntheticRowsConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.g = torch.Generator().manual_seed(cfg.seed)

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=self.g))

    def _sample(self, budget: int, tiles_left: int) -> Tuple[int, int]:
        """(length, tiles) of one sample fitting `budget` tokens and `tiles_left` tiles."""
        c = self.cfg
        length = min(self._randint(c.min_sample_tokens, c.max_sample_tokens), budget)
        tiles = min(self._randint(1, c.max_tiles_per_sample), tiles_left, (length - 16) // c.tokens_per_tile)
        return length, max(tiles, 0)

    def _row(self) -> Tuple[List[int], List[int]]:
        c = self.cfg
        if not c.packed:
            length, tiles = self._sample(c.seq_length, c.max_tiles_per_pack)
            return [length], [tiles]
        lengths, tiles, used, tiles_used = [], [], 0, 0
        while c.seq_length - used >= 16 + c.tokens_per_tile and tiles_used < c.max_tiles_per_pack:
            length, n = self._sample(c.seq_length - used, c.max_tiles_per_pack - tiles_used)
            if n == 0:
                break
            lengths.append(length)
            tiles.append(n)
            used, tiles_used = used + length, tiles_used + n
        return lengths, tiles

    def _batch(self, lengths: List[int], tiles: List[int]) -> Batch:
        c = self.cfg
        s = c.seq_length
        tokens = torch.randint(FIRST_TEXT_ID, c.vocab_size, (s + 1,), generator=self.g)
        loss_mask = torch.zeros(s)
        position_ids = torch.zeros(s, dtype=torch.long)
        offset = 0
        for length, n in zip(lengths, tiles):
            tokens[offset + 1 : offset + 1 + n * c.tokens_per_tile] = c.image_token_id
            loss_mask[offset + 1 + n * c.tokens_per_tile : offset + length - 1] = 1.0
            position_ids[offset : offset + length] = torch.arange(length)
            offset += length
        tokens[offset:] = 0
        cu = None
        if c.packed:
            bounds = [0] + torch.tensor(lengths).cumsum(0).tolist()
            if bounds[-1] < s:
                bounds.append(s)  # the tail padding is a segment of its own
            cu = torch.tensor(bounds, dtype=torch.int32)
        else:
            position_ids = torch.arange(s)
        images = [n for n in tiles if n > 0]  # one image per sample
        share, own = None, images
        if c.vision_rank is not None and images:
            share = VisionShare.of(images, c.vision_rank[1], c.tokens_per_tile)
            own = [images[i] for i in share.images_of(c.vision_rank[0])]
        pixels = torch.randn(sum(own), 3, c.tile_size, c.tile_size, device=self.device)
        batch = Batch(
            tokens=tokens[None, :-1],
            labels=tokens[None, 1:],
            loss_mask=loss_mask[None],
            position_ids=position_ids[None],
            pixel_values=pixels,
            cu_seqlens=cu,
            max_seqlen=int((cu[1:] - cu[:-1]).max()) if c.packed else 0,
            tile_count=sum(tiles),
            image_count=len(images),
            decoded_images=len(own),
            vision_share=share,
        )
        return batch.to(self.device)

    def __iter__(self) -> Iterator[Tuple[Batch, List[int]]]:
        while True:
            lengths, tiles = self._row()
            yield self._batch(lengths, tiles), lengths


# --- sample distributions ------------------------------------------------------------------------------

SAIL_VL_TOKENS_PER_TILE = 256


def _internvl_tiles(rng: np.random.Generator, max_grid: int, size: int) -> np.ndarray:
    grid = rng.integers(1, max_grid + 1, size)
    return grid + (grid > 1)  # thumbnail only when the image was split


def _lognormal(rng: np.random.Generator, median: float, sigma: float, lo: int, hi: int, size: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(math.log(median), sigma, size)), lo, hi).astype(np.int64)


def sft_like(
    n: int, seed: int = 0, text_median: int = 300, tokens_per_tile: int = SAIL_VL_TOKENS_PER_TILE
) -> Tuple[np.ndarray, np.ndarray]:
    """(tokens, tiles) for n SFT-like samples; see the module docstring."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n, p=[0.4, 0.4, 0.2])
    tiles = np.zeros(n, dtype=np.int64)
    images = np.zeros(n, dtype=np.int64)
    single = kind == 1
    tiles[single] = _internvl_tiles(rng, 6, int(single.sum()))
    images[single] = 1
    for i in np.flatnonzero(kind == 2):
        count = int(rng.integers(2, 5))
        tiles[i] = _internvl_tiles(rng, max(1, 6 // count), count).sum()
        images[i] = count
    text = np.where(kind == 0, _lognormal(rng, text_median, 0.9, 50, 3000, n), _lognormal(rng, 250, 0.8, 20, 1500, n))
    return text + tiles * tokens_per_tile + 2 * images, tiles


def caption_like(
    n: int, seed: int = 0, tokens_per_tile: int = SAIL_VL_TOKENS_PER_TILE
) -> Tuple[np.ndarray, np.ndarray]:
    """(tokens, tiles) for n caption-pretraining samples; see the module docstring."""
    rng = np.random.default_rng(seed)
    tiles = _internvl_tiles(rng, 6, n)
    return _lognormal(rng, 40, 0.6, 5, 200, n) + tiles * tokens_per_tile + 2, tiles
