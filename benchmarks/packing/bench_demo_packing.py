#!/usr/bin/env python
"""Packer figures on the embedded demo dataset: token-slot utilization and tile balance of plan_packs
vs first-fit-decreasing, at the tiny model's shapes and at SAIL-VL's real ones (448 px tiles, 256
tokens per tile, up to 6 tiles + thumbnail, 4096-token rows).

  python benchmarks/packing/bench_demo_packing.py [--demo DIR]
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the tests' baseline lives in the repo

import numpy as np  # noqa: E402

from sail_megatron.config.data import DataConfig  # noqa: E402
from sail_megatron.data.loader import build_train_loader  # noqa: E402
from sail_megatron.data.packing import plan_packs  # noqa: E402
from sail_megatron.data.tokenizer import load_tokenizer  # noqa: E402
from tests.data.test_packing import first_fit_decreasing  # noqa: E402


def sample_counts(dataset: Path, tokenizer, tile: int, per_tile: int, max_tiles: int, seq: int, n: int):
    """(tokens, tiles) of the first n samples of one epoch (padded loader, no shuffle: each sample once)."""
    cfg = DataConfig(
        path=str(dataset),
        tokenizer="-",
        seq_length=seq,
        micro_batch_size=1,
        max_tiles=max_tiles,
        num_workers=0,
        shuffle_buffer_size=0,
        packing=False,
    )
    it = iter(build_train_loader(cfg, tokenizer, tile, per_tile))
    counts = []
    for _ in range(n):
        raw = next(it)
        ((_, start, end),) = raw.spans
        counts.append((end - start, raw.num_tiles))
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", help="a `sail-data demo` folder (built in a temp dir if absent)")
    args = p.parse_args()
    if args.demo:
        root = Path(args.demo)
    else:
        from sail_megatron.data.cli import build_demo

        root = build_demo(Path(tempfile.mkdtemp()) / "demo")
    tokenizer = load_tokenizer(root / "raw" / "tokenizer")
    shapes = {
        "tiny (112 px, 16 tok/tile, seq 512)": (112, 16, 4, 512, 24),
        "SAIL-VL (448 px, 256 tok/tile, seq 4096)": (448, 256, 6, 4096, 40),
    }
    print(f"{'shapes':<42}{'planner':<22}{'packs':>6}{'util':>9}{'max/mean':>10}")
    for name, (tile, per_tile, max_tiles, seq, pack_tiles) in shapes.items():
        counts = []
        for dataset, n in (("captions", 40), ("sft", 40)):
            counts += sample_counts(root / dataset, tokenizer, tile, per_tile, max_tiles, seq, n)
        tokens, tiles = [c[0] for c in counts], [c[1] for c in counts]
        plan = plan_packs(tokens, tiles, seq, pack_tiles, seed=0)
        baseline = first_fit_decreasing(np.array(tokens), np.array(tiles), seq, pack_tiles)
        for planner, packs in (("plan_packs", plan.packs), ("first_fit_decreasing", baseline.packs)):
            loads = [sum(tiles[i] for i in pk) for pk in packs]
            util = sum(tokens) / (len(packs) * seq)
            print(f"{name:<42}{planner:<22}{len(packs):>6}{util:>9.1%}{max(loads) / (sum(loads) / len(loads)):>10.3f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
