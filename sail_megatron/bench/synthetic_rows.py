"""Synthetic micro-batches shaped like a real VLM stream, for throughput only (nothing to learn).

Samples have random lengths with one image block of 1..max_tiles tiles inside them; packed rows are
filled to seq_length in THD form (as the packer does with real data), padded rows hold one sample
each. Pixels are generated on the device: the benchmark measures training, not a host RNG.
"""

from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch

from sail_megatron.data.batch import Batch

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
        pixels = torch.randn(sum(tiles), 3, c.tile_size, c.tile_size, device=self.device)
        batch = Batch(
            tokens=tokens[None, :-1],
            labels=tokens[None, 1:],
            loss_mask=loss_mask[None],
            position_ids=position_ids[None],
            pixel_values=pixels,
            cu_seqlens=cu,
            max_seqlen=int((cu[1:] - cu[:-1]).max()) if c.packed else 0,
        )
        return batch.to(self.device)

    def __iter__(self) -> Iterator[Tuple[Batch, List[int]]]:
        while True:
            lengths, tiles = self._row()
            yield self._batch(lengths, tiles), lengths
