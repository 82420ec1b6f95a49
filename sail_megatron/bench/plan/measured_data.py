"""The stage's data as `sail-data prepare --recipe` measured it (data/statistics.py): the mean tokens, image
tokens and tiles per sample of the recipe's data.path when it is here, and the synthetic samples rescaled to
those means, which `sail-bench plan` counts FLOPs and packs rows over in place of the synthetic assumption."""

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from sail_megatron.config import ConfigError
from sail_megatron.config.train import TrainConfig
from sail_megatron.data.statistics import TokenStatistics, token_statistics

RESCALE_ROUNDS = 20
RESCALE_TOLERANCE = 1e-3
"""Relative distance to the measured means at which the rescaling stops."""


def measured_statistics(cfg: TrainConfig) -> Tuple[Optional[TokenStatistics], str]:
    """(the measured means of data.path's train split, "") or (None, why there are none), in one line."""
    path = cfg.data.path
    if not path:
        return None, "data.path is not set"
    if not Path(path).exists():
        return None, f"data.path {path} not found here"
    try:
        stats = token_statistics(path)
    except ConfigError as e:
        reason = str(e).split(". Fix: ")[0].removeprefix(f"{e.field}: ")
        return None, f"data.path is not a prepared dataset or blend ({reason})"
    except (ValueError, OSError) as e:
        return None, f"data.path {path} has no readable token statistics ({e})"
    if stats is None:
        return None, f"data.path {path} has no token statistics (prepared without `sail-data prepare --recipe`)"
    return stats, ""


def coverage(stats: TokenStatistics) -> str:
    """'measured by sail-data prepare --recipe on 3 of 4 datasets, 92.5% of the sampling weight'."""
    text = "measured by sail-data prepare --recipe"
    if stats.datasets == 1:
        return text
    text += f" on {stats.datasets_measured} of {stats.datasets} datasets"
    return text if stats.complete else f"{text}, {100 * stats.weight_measured:.1f}% of the sampling weight"


def rescaled(
    tokens: np.ndarray, tiles: np.ndarray, stats: TokenStatistics, cfg: TrainConfig
) -> Tuple[np.ndarray, np.ndarray]:
    """The synthetic samples (tokens, tiles) with their tiles and their text scaled so that their means are the
    measured ones: the shape of the distribution stays the synthetic one. Tiles are rounded at random (seed
    1, so the mean stays) and capped at data.max_tiles_per_pack, samples at data.seq_length; the factors are
    corrected until the means are within 0.1% (or for RESCALE_ROUNDS rounds, when the caps do not allow it)."""
    per_tile, seq, cap = cfg.model.tokens_per_tile, cfg.data.seq_length, cfg.data.max_tiles_per_pack
    text = tokens - tiles * per_tile  # the text and the image markers
    want_tiles = stats.mean_tiles_per_sample
    want_text = max(stats.mean_tokens_per_sample - stats.mean_image_tokens_per_sample, 1.0)
    tile_scale, text_scale = want_tiles / max(tiles.mean(), 1e-9), want_text / text.mean()
    draws = np.random.default_rng(1).random(len(tiles))
    for _ in range(RESCALE_ROUNDS):
        new_tiles = np.minimum(np.floor(tiles * tile_scale + draws), min(cap, (seq - 1) // per_tile))
        new_tiles = new_tiles.astype(np.int64)
        new_tokens = np.minimum(np.maximum(np.round(text * text_scale), 1).astype(np.int64) + new_tiles * per_tile, seq)
        got_tiles, got_text = new_tiles.mean(), (new_tokens - new_tiles * per_tile).mean()
        close_tiles = abs(got_tiles - want_tiles) <= RESCALE_TOLERANCE * max(want_tiles, 1e-9)
        if close_tiles and abs(got_text - want_text) <= RESCALE_TOLERANCE * want_text:
            break
        tile_scale *= want_tiles / got_tiles if got_tiles else 1.0
        text_scale *= want_text / got_text
    return new_tokens, new_tiles
