"""A tiny real SAIL-VL training run: `torchrun --nproc-per-node 4 -m sail_megatron.demo --tp 2 --pp 2`.

Builds the model stage of every rank, wraps it in megatron-core DDP with the distributed optimizer,
and trains under the pipeline schedule on prepared shards (`--data`, e.g. the demo dataset from
`sail-data demo`) or on synthetic image-caption micro-batches, printing loss and throughput per step.
"""

import argparse
import logging
import time

import torch.distributed as dist
from megatron.core import parallel_state

from sail_megatron.config import FreezeConfig, ParallelConfig, PrecisionConfig
from sail_megatron.config.data import DataConfig
from sail_megatron.data.decode import BatchMaterializer, build_tile_decoder
from sail_megatron.data.loader import build_train_loader
from sail_megatron.data.synthetic import IMG_CONTEXT, SyntheticConfig, SyntheticImageCaptions
from sail_megatron.data.tokenizer import load_tokenizer
from sail_megatron.model.build import build_model
from sail_megatron.model.presets import get_preset
from sail_megatron.platform import destroy_distributed, detect_backends, init_distributed, read_dist_env
from sail_megatron.training.freezing import apply_freezing
from sail_megatron.training.optimizer import OptimConfig, setup_training
from sail_megatron.training.step import train_step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--num-microbatches", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data", default=None, help="prepared dataset folder or blend YAML (default: synthetic data)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer folder (required with --data)")
    p.add_argument("--max-tiles", type=int, default=4, help="tiles per image (plus a thumbnail)")
    p.add_argument("--no-packing", action="store_true",
                   help="one sample per row, padded (default with --data: pack samples into rows, micro-batch 1)")
    p.add_argument("--max-tiles-per-pack", type=int, default=24)
    p.add_argument("--decoder", default="auto", choices=["auto", "dali", "pil"])
    p.add_argument("--num-workers", type=int, default=1, help="loader worker processes per rank")
    p.add_argument("--fp8", choices=["hybrid", "e4m3"], default=None,
                   help="Transformer Engine FP8 for the language model's linear layers (GPU + TE only)")
    p.add_argument("--trainable", default="vision,projector,language",
                   help="comma-separated parts that train (vision, projector, language)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    env = read_dist_env()
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines dump whole configs
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    precision = PrecisionConfig(dtype="bf16" if detect_backends().cuda else "fp32", fp8=args.fp8)
    freeze = FreezeConfig(trainable=[p for p in args.trainable.split(",") if p])
    model_cfg = get_preset(args.preset)
    tokenizer = None
    if args.data:
        if not args.tokenizer:
            raise SystemExit("--data needs --tokenizer (the demo dataset's is DIR/raw/tokenizer)")
        tokenizer = load_tokenizer(args.tokenizer)
        if args.preset == "tiny":  # the toy model takes the toy tokenizer's vocabulary
            model_cfg.language.vocab_size = tokenizer.vocab_size
        elif tokenizer.vocab_size > model_cfg.language.vocab_size:
            raise SystemExit(f"tokenizer has {tokenizer.vocab_size} tokens, the model {model_cfg.language.vocab_size}")
        model_cfg.image_context_token_id = tokenizer.ids.img_context
    else:
        model_cfg.image_context_token_id = IMG_CONTEXT
    # Every check runs before any process group exists, so a bad layout fails fast on all ranks.
    model_cfg.validate()
    parallel.validate(model_cfg, env.world_size)
    precision.validate(has_cuda=detect_backends().cuda, has_te=detect_backends().transformer_engine)
    freeze.validate()

    init_distributed(parallel, seed=args.seed)
    model = build_model(model_cfg, parallel, precision)
    apply_freezing(model, freeze)
    model.to(env.device)
    optim = OptimConfig(lr=args.lr, min_lr=args.lr / 10, warmup_steps=min(5, args.steps // 5), decay_steps=args.steps)
    chunks, optimizer, scheduler = setup_training(model, optim, parallel, precision)

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    materializer = None
    if tokenizer is not None:
        data_cfg = DataConfig(path=args.data, tokenizer=args.tokenizer, seq_length=args.seq_length,
                              micro_batch_size=args.micro_batch_size, max_tiles=args.max_tiles,
                              num_workers=args.num_workers, decoder=args.decoder, packing=not args.no_packing,
                              max_tiles_per_pack=args.max_tiles_per_pack)
        data_cfg.validate()
        loader = build_train_loader(data_cfg, tokenizer, model_cfg.vision.image_size, model_cfg.tokens_per_tile,
                                    dp_rank, dp_size, seed=args.seed)
        materializer = BatchMaterializer(build_tile_decoder(args.decoder, env.device), model_cfg.vision.image_size,
                                         env.device, model_cfg.tokens_per_tile, tokenizer.ids.img_context)
        data = (materializer(raw) for raw in loader)
    else:
        synthetic = SyntheticConfig(seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                                    image_size=model_cfg.vision.image_size, tokens_per_tile=model_cfg.tokens_per_tile,
                                    vocab_size=model_cfg.language.vocab_size, seed=args.seed)
        data = SyntheticImageCaptions(synthetic).micro_batches(dp_rank, dp_size, args.num_microbatches)
    global_batch = args.micro_batch_size * args.num_microbatches * dp_size
    if env.is_main:
        print(f"demo: preset={args.preset} world={env.world_size} TP={args.tp} PP={args.pp} DP={dp_size} "
              f"rows per step={global_batch} seq_length={args.seq_length} trainable={freeze.trainable}", flush=True)

    losses = []
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        result = train_step(chunks, optimizer, scheduler, data, args.num_microbatches, args.seq_length,
                            args.micro_batch_size)
        elapsed = time.perf_counter() - start
        losses.append(result.loss)
        if env.is_main:
            slots = global_batch * args.seq_length
            print(f"step {step:4d}/{args.steps} | loss {result.loss:.4f} | grad norm {result.grad_norm:.3f} | "
                  f"lr {scheduler.get_lr(optimizer.param_groups[0]):.2e} | {elapsed * 1000:.0f} ms | "
                  f"{slots / elapsed:,.0f} token slots/s ({result.trained_tokens / elapsed:,.0f} trained) | "
                  f"{global_batch / elapsed:.1f} rows/s", flush=True)
    if env.is_main:
        k = max(1, min(5, len(losses) // 2))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"demo: mean loss of the first {k} steps {first:.4f} -> last {k} steps {last:.4f}", flush=True)
        if materializer is not None:
            print(f"demo: data: skipped {dict(materializer.skipped) or 'none'}, "
                  f"converted {dict(materializer.conversions) or 'none'}", flush=True)
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
