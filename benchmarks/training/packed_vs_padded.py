#!/usr/bin/env python
"""Tokens/s of packed vs padded training of the tiny model on the same data, side by side in one run.

Single process on the CPU (or one GPU). Both modes read the same prepared dataset (the embedded demo
data unless --data is given), run the same model from the same seed, and count real tokens (padding
excluded) per second over the timed steps. Ratios are what matter on a CPU.

  python benchmarks/training/packed_vs_padded.py [--data DIR/blend.yaml --tokenizer DIR] [--steps 12]
"""

import argparse
import os
import tempfile
import time

import torch

from sail_megatron.config import ParallelConfig, PrecisionConfig
from sail_megatron.config.data import DataConfig
from sail_megatron.data.decode import BatchMaterializer, build_tile_decoder
from sail_megatron.data.loader import build_train_loader
from sail_megatron.data.tokenizer import load_tokenizer
from sail_megatron.model.build import build_model
from sail_megatron.model.presets import get_preset
from sail_megatron.platform import destroy_distributed, detect_backends, init_distributed, read_dist_env
from sail_megatron.training.optimizer import OptimConfig, setup_training
from sail_megatron.training.step import train_step


def run_mode(packing: bool, args, tokenizer) -> dict:
    parallel = ParallelConfig()
    precision = PrecisionConfig(dtype="bf16" if detect_backends().cuda else "fp32")
    env = init_distributed(parallel, seed=args.seed)
    try:
        cfg = get_preset("tiny")
        cfg.language.vocab_size = tokenizer.vocab_size
        cfg.image_context_token_id = tokenizer.ids.img_context
        model = build_model(cfg, parallel, precision)
        chunks, optimizer, scheduler = setup_training(model, OptimConfig(lr=1e-3, decay_steps=1000), parallel,
                                                      precision)
        mbs = 1 if packing else args.padded_batch
        data_cfg = DataConfig(path=args.data, tokenizer=args.tokenizer, seq_length=args.seq_length,
                              micro_batch_size=mbs, max_tiles=4, num_workers=1, packing=packing,
                              max_tiles_per_pack=args.max_tiles_per_pack)
        loader = build_train_loader(data_cfg, tokenizer, cfg.vision.image_size, cfg.tokens_per_tile, seed=args.seed)
        materialize = BatchMaterializer(build_tile_decoder("auto", env.device), cfg.vision.image_size, env.device,
                                        cfg.tokens_per_tile, tokenizer.ids.img_context)
        counted = {"tokens": 0, "samples": 0, "tiles": 0}

        def batches():
            for raw in loader:
                counted["tokens"] += sum(end - start for _, start, end in raw.spans)
                counted["samples"] += len(raw.keys)
                counted["tiles"] += raw.num_tiles
                yield materialize(raw)

        data = batches()
        # Same number of token slots per step in both modes: packed rows x 1 vs padded rows x B.
        micro = args.rows_per_step // mbs
        step = lambda: train_step(chunks, optimizer, scheduler, data, micro, args.seq_length, mbs)
        for _ in range(args.warmup):
            step()
        counted.update(tokens=0, samples=0, tiles=0)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = time.perf_counter() - start
        slots = args.steps * args.rows_per_step * args.seq_length
        return {"tokens_per_s": counted["tokens"] / seconds, "samples_per_s": counted["samples"] / seconds,
                "slot_utilization": counted["tokens"] / slots, "step_s": seconds / args.steps}
    finally:
        destroy_distributed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data")
    p.add_argument("--tokenizer")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--rows-per-step", type=int, default=4)
    p.add_argument("--padded-batch", type=int, default=2)
    p.add_argument("--max-tiles-per-pack", type=int, default=24)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("MASTER_PORT", "29517")
    if not args.data:
        from sail_megatron.data.cli import build_demo

        root = build_demo(os.path.join(tempfile.mkdtemp(), "demo"))
        args.data, args.tokenizer = str(root / "blend.yaml"), str(root / "raw" / "tokenizer")
    tokenizer = load_tokenizer(args.tokenizer)
    results = {"padded": run_mode(False, args, tokenizer), "packed": run_mode(True, args, tokenizer)}
    print(f"device {read_dist_env().device}, seq_length {args.seq_length}, {args.rows_per_step} rows/step, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'mode':<8}{'tokens/s':>12}{'samples/s':>12}{'slot use':>10}{'s/step':>9}")
    for mode, r in results.items():
        print(f"{mode:<8}{r['tokens_per_s']:>12,.0f}{r['samples_per_s']:>12.2f}{r['slot_utilization']:>9.1%}"
              f"{r['step_s']:>9.2f}")
    print(f"packed / padded tokens/s: {results['packed']['tokens_per_s'] / results['padded']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
