"""Which tensor-parallel rank decodes and encodes which image of a micro-batch (`parallel.vision_parallel:
data`): whole images, balanced by tiles, decided from the tile plans alone so that every rank of a model
replica computes the same answer without talking to the others."""

from dataclasses import dataclass
from typing import List, Sequence, Tuple


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


@dataclass(frozen=True)
class VisionShare:
    """The images of one micro-batch (tiles per image, in order) and the rank that owns each."""

    tiles: Tuple[int, ...]
    owners: Tuple[int, ...]

    @classmethod
    def of(cls, tiles: Sequence[int], ranks: int) -> "VisionShare":
        return cls(tuple(tiles), assign_images(tiles, ranks))

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
