"""The training driver: `torchrun ... -m sail_megatron.train --config RECIPE.yaml [key=value ...]`.

Resolves and validates the recipe before any process group exists, builds this rank's model stage,
freezes by stage, starts from `run.init_from` (the previous stage's weights) or resumes exactly from
the run's own latest checkpoint (model, optimizer, scheduler, RNG and loader state), trains on packed
micro-batches and saves every `run.save_interval` steps.
"""

import argparse
import logging
import time
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from sail_megatron.config import ConfigError
from sail_megatron.config.train import dump, load_train_config
from sail_megatron.data.decode import BatchMaterializer, build_tile_decoder
from sail_megatron.data.loader import build_train_loader
from sail_megatron.data.tokenizer import load_tokenizer
from sail_megatron.model.build import build_model
from sail_megatron.platform import destroy_distributed, detect_backends, init_distributed, read_dist_env
from sail_megatron.training.checkpoint import LATEST, load_checkpoint, restore_rng_state, save_checkpoint
from sail_megatron.training.freezing import apply_freezing
from sail_megatron.training.optimizer import setup_training
from sail_megatron.training.step import train_step

logger = logging.getLogger("sail_megatron.train")


def prepare_config(args, world_size: int):
    """Everything that can be wrong with the recipe fails here, on every rank, before any collective."""
    cfg = load_train_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.language.vocab_size:
        raise ConfigError("model.language.vocab_size", f"{cfg.model.language.vocab_size} rows cannot embed the "
                          f"tokenizer's {tokenizer.vocab_size} tokens", "use the tokenizer the model was trained with")
    cfg.model.image_context_token_id = tokenizer.ids.img_context
    backends = detect_backends()
    cfg.validate(world_size, has_cuda=backends.cuda, has_te=backends.transformer_engine)
    return cfg, tokenizer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = p.parse_args(argv)
    env = read_dist_env()
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    cfg, tokenizer = prepare_config(args, env.world_size)
    run = cfg.run
    save_dir = Path(run.save_dir)

    init_distributed(cfg.parallel, seed=run.seed)
    if env.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "config.yaml").write_text(dump(cfg))
    model = build_model(cfg.model, cfg.parallel, cfg.precision)
    apply_freezing(model, cfg.freeze)
    model.to(env.device)
    chunks, optimizer, scheduler = setup_training(model, cfg.optim, cfg.parallel, cfg.precision)

    start, loader_state = 0, None
    if (save_dir / LATEST).is_file():
        loaded = load_checkpoint(save_dir, chunks, optimizer, scheduler)
        start = loaded["iteration"]
        if loaded["rank_state"] is not None:
            restore_rng_state(loaded["rank_state"]["rng"])
            loader_state = loaded["rank_state"].get("loader")
        logger.info("resumed from %s at step %d", loaded["path"], start)
    elif run.init_from:
        loaded = load_checkpoint(run.init_from, chunks)  # weights only: a new stage starts a new optimizer
        logger.info("initialized from %s (its step %d)", loaded["path"], loaded["iteration"])

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    num_micro = cfg.num_microbatches(env.world_size)
    tile = cfg.model.vision.image_size
    loader = build_train_loader(cfg.data, tokenizer, tile, cfg.model.tokens_per_tile, dp_rank, dp_size,
                                seed=run.seed, state=loader_state)
    materialize = BatchMaterializer(build_tile_decoder(cfg.data.decoder, env.device), tile, env.device,
                                    cfg.model.tokens_per_tile, tokenizer.ids.img_context)
    data = (materialize(raw) for raw in loader)
    slots = run.global_batch_size * cfg.data.seq_length
    logger.info("training %s (%s) steps %d..%d: world %d = TP %d x PP %d x DP %d, %d micro-batches per step",
                args.config, cfg.model_preset, start, run.train_steps, env.world_size,
                cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size, dp_size, num_micro)
    for step in range(start, run.train_steps):
        began = time.perf_counter()
        result = train_step(chunks, optimizer, scheduler, data, num_micro, cfg.data.seq_length,
                            cfg.data.micro_batch_size)
        elapsed = time.perf_counter() - began
        if env.is_main and (step + 1) % run.log_interval == 0:
            print(f"step {step + 1:6d}/{run.train_steps} | loss {result.loss:.4f} | grad norm {result.grad_norm:.3f} "
                  f"| lr {scheduler.get_lr(optimizer.param_groups[0]):.2e} | {elapsed * 1000:.0f} ms | "
                  f"{slots / elapsed:,.0f} token slots/s | skipped {dict(materialize.skipped) or 0}", flush=True)
        if (step + 1) % run.save_interval == 0 or step + 1 == run.train_steps:
            save_checkpoint(save_dir, step + 1, chunks, optimizer, scheduler, keep_last=run.keep_last,
                            common={"consumed_rows": (step + 1) * run.global_batch_size},
                            rank_state={"loader": loader.save_state_rank()})
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
