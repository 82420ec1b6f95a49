"""Which tensor-parallel rank decodes and encodes which image of a micro-batch (`parallel.vision_parallel:
data`): whole images, balanced by tiles, decided from the tile plans alone so that every rank of a model
replica computes the same answer without talking to the others."""

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch


def assign_images(tiles: Sequence[int], ranks: int) -> Tuple[int, ...]:
    """Owner rank per image: largest images first, each to the rank with the fewest tiles so far (the
    lowest rank on a tie). Deterministic, so every rank of a replica agrees."""
    load = [0] * ranks
    owners = [0] * len(tiles)
    for image in sorted(range(len(tiles)), key=lambda i: (-tiles[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[image] = rank
        load[rank] += tiles[image]
    return tuple(owners)


@dataclass(frozen=True, eq=False)
class VisionShare:
    """The images of one micro-batch (tiles per image, in order) and the rank that owns each, with the
    row order that puts the ranks' gathered vision tokens back in image order (built on the host with the
    batch and moved with it, so the model never waits for the host)."""

    tiles: Tuple[int, ...]
    owners: Tuple[int, ...]
    ranks: int = 1
    index: Optional[torch.Tensor] = None
    """gather_order(...) as int64 rows: the tokens of every image, in order, within the ranks' gathered
    outputs ([ranks * rows_per_rank(tokens_per_tile)] rows)."""

    @classmethod
    def of(
        cls, tiles: Sequence[int], ranks: int, tokens_per_tile: Optional[int] = None, pin: bool = False
    ) -> "VisionShare":
        """pin: page-lock the index, so its copy to a GPU does not block the host."""
        share = cls(tuple(tiles), assign_images(tiles, ranks), ranks)
        if tokens_per_tile is None:
            return share
        index = torch.tensor(share.gather_order(ranks, tokens_per_tile, share.rows_per_rank(tokens_per_tile)))
        return dataclasses.replace(share, index=index.pin_memory() if pin else index)

    def rows_per_rank(self, tokens_per_tile: int) -> int:
        """Rows each rank contributes to the gather: the largest share, padded to by the others."""
        return max(self.tiles_per_rank(self.ranks)) * tokens_per_tile

    def to(self, device) -> "VisionShare":
        if self.index is None:
            return self
        return dataclasses.replace(self, index=self.index.to(device, non_blocking=True))

    def images_of(self, rank: int) -> List[int]:
        """The images `rank` decodes and encodes, in micro-batch order."""
        return [i for i, owner in enumerate(self.owners) if owner == rank]

    def tiles_per_rank(self, ranks: int) -> List[int]:
        out = [0] * ranks
        for n, owner in zip(self.tiles, self.owners):
            out[owner] += n
        return out

    def gather_order(self, ranks: int, tokens_per_tile: int, rows_per_rank: int) -> List[int]:
        """Row indices into the ranks' gathered outputs ([ranks * rows_per_rank, h], each rank's images in
        micro-batch order, then padding) that put every image's tokens back in micro-batch order."""
        filled = [0] * ranks
        order: List[int] = []
        for n, owner in zip(self.tiles, self.owners):
            start = owner * rows_per_rank + filled[owner]
            rows = n * tokens_per_tile
            order.extend(range(start, start + rows))
            filled[owner] += rows
        return order
