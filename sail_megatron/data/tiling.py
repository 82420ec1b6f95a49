"""InternVL dynamic tiling: which (cols, rows) grid an image is cut into.

The rule is InternVL's `dynamic_preprocess` / `find_closest_aspect_ratio`, reproduced exactly
(candidate order and the tie-break included) so a checkpoint sees the same tiles it was trained on.
"""

from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    # Built exactly as InternVL does: a set, then a stable sort by tile count. The set's iteration
    # order (deterministic for small int tuples) decides the order among equal tile counts.
    target_ratios = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_tiles and i * j >= min_tiles
    )
    return tuple(sorted(target_ratios, key=lambda x: x[0] * x[1]))


def choose_grid(
    width: int, height: int, min_tiles: int = 1, max_tiles: int = 6, tile_size: int = 448
) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to width/height, InternVL's tie-break included."""
    for name, value in (("width", width), ("height", height), ("tile_size", tile_size)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if min_tiles < 1:
        raise ValueError(f"min_tiles must be >= 1, got {min_tiles}")
    if max_tiles < min_tiles:
        raise ValueError(f"max_tiles must be >= min_tiles ({min_tiles}), got {max_tiles}")

    aspect_ratio = width / height
    area = width * height
    best_ratio_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        ratio_diff = abs(aspect_ratio - cols / rows)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best = (cols, rows)
        elif ratio_diff == best_ratio_diff:
            # Same shape, more tiles: taken only if the image has enough pixels to fill them halfway.
            if area > 0.5 * tile_size * tile_size * cols * rows:
                best = (cols, rows)
    return best


@dataclass(frozen=True)
class TilePlan:
    """How one image is cut: a cols x rows grid, plus a whole-image thumbnail tile last."""

    cols: int
    rows: int
    thumbnail: bool

    @property
    def num_tiles(self) -> int:
        return self.cols * self.rows + (1 if self.thumbnail else 0)


def plan_tiles(
    width: int,
    height: int,
    min_tiles: int = 1,
    max_tiles: int = 6,
    tile_size: int = 448,
    use_thumbnail: bool = True,
) -> TilePlan:
    """The grid for an image; a thumbnail is added only when there is more than one tile (as InternVL)."""
    cols, rows = choose_grid(width, height, min_tiles, max_tiles, tile_size)
    return TilePlan(cols=cols, rows=rows, thumbnail=use_thumbnail and cols * rows > 1)
