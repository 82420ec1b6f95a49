"""ViT padding under FP8 per micro-batch: blank tiles up to a tile multiple vs the packed tile layout.

Hopper's FP8 weight-gradient GEMM needs the ViT's token count % 16 (32 for MXFP8). InternViT tiles hold
1025 tokens, so a batched ViT pads the tile count: to a multiple of 8 before (which met only the forward's
% 8 check and failed in the first backward), to 16 to meet the rule (AIMv2's 1024 need none); the packed layout (tiles as THD
segments, model/tile_layout.py) pads tokens instead. Micro-batches come from the pack planner on the
SFT-like and caption-like distributions the packing tests use; a text-only micro-batch runs one blank tile.

    python benchmarks/model/bench_fp8_vit_padding.py [--samples 10000] [--seq-length 4096] [--max-tiles 40]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root: the tests' generators

from sail_megatron.config.presets import PRESETS  # noqa: E402
from sail_megatron.data.packing import plan_packs  # noqa: E402
from sail_megatron.model.fp8_shapes import fp8_token_multiple  # noqa: E402
from sail_megatron.model.tile_layout import TileLayout  # noqa: E402
from tests.data.test_packing import caption_like, sft_like  # noqa: E402


def _blank_tile_tokens(tiles: int, token_multiple: int, tokens_per_tile: int) -> int:
    """Blank-tile padding of a batched ViT: the tile count rounded up so that tiles x tokens divide."""
    tile_multiple = token_multiple // math.gcd(token_multiple, tokens_per_tile)
    return (-tiles % tile_multiple) * tokens_per_tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--max-tiles", type=int, default=40)
    parser.add_argument("--preset", default="sail-vl-2b")
    parser.add_argument("--fp8-recipe", default="delayed")
    args = parser.parse_args()
    s = PRESETS[args.preset].vision.num_positions
    multiple = fp8_token_multiple(args.fp8_recipe)
    layout = TileLayout(s, multiple)
    print(f"{args.preset}: {s} ViT tokens per tile; FP8 {args.fp8_recipe}: tokens % {multiple}")
    header = f"{'distribution':<10} {'layout':<30} {'pad tokens/mb mean':>19} {'max':>7} {'ViT tokens +':>11}"
    print(header)
    print("-" * len(header))
    for name, make in (("sft", sft_like), ("caption", caption_like)):
        tokens, tiles = make(args.samples, seed=0)
        plan = plan_packs(tokens, tiles, args.seq_length, args.max_tiles)
        real = [max(t, 1) for t in plan.tiles_per_pack(tiles)]  # a text-only micro-batch: one blank tile
        layouts = (
            ("blank tiles, tokens % 8 (old)", lambda t: _blank_tile_tokens(t, 8, s)),
            (f"blank tiles, tokens % {multiple}", lambda t: _blank_tile_tokens(t, multiple, s)),
            ("packed tiles + pad segment", lambda t: layout.pad_tokens(t)),
        )
        for label, pad in layouts:
            pads = [pad(t) for t in real]
            work = sum(pads) / sum(t * s for t in real)
            print(f"{name:<10} {label:<30} {sum(pads) / len(pads):>19.1f} {max(pads):>7} {work:>10.2%}")


if __name__ == "__main__":
    main()
