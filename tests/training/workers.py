"""Rank functions for the optimizer, recompute and fault tests (module level so spawned ranks import them)."""

from typing import Dict, Optional

import torch
from megatron.core import parallel_state

from sail_megatron.config import ParallelConfig, PrecisionConfig
from sail_megatron.config.optim import OptimConfig
from sail_megatron.data.synthetic import IMG_CONTEXT
from sail_megatron.model.build import build_model
from sail_megatron.model.presets import get_preset
from sail_megatron.platform import destroy_distributed, init_distributed
from sail_megatron.training.checkpoint import load_checkpoint, save_checkpoint
from sail_megatron.training.optimizer import setup_training
from sail_megatron.training.step import train_step
from tests.helpers.schedules import steps_schedule
from tests.parallel.workers import MBS, SEQ, _data

FP32 = PrecisionConfig(dtype="fp32")


def _model(parallel: ParallelConfig, drop_path: float = 0.0):
    cfg = get_preset("tiny")
    cfg.image_context_token_id = IMG_CONTEXT
    cfg.vision.drop_path_rate = drop_path
    return cfg, build_model(cfg, parallel, FP32)


def _groups(optimizer):
    return [(g["max_lr"], g["min_lr"], g["lr"], g["wd_mult"], len(g["params"])) for g in optimizer.param_groups]


def part_lrs_survive_resume(directory: str) -> Dict:
    """Per-part lrs land in the right param groups, and still do after a checkpoint round trip."""
    parallel = ParallelConfig()
    init_distributed(parallel, seed=1)
    try:
        optim = OptimConfig(lr=1e-3, min_lr=1e-5, vision_lr=1e-4, warmup_steps=1, decay_steps=10)
        cfg, model = _model(parallel)
        chunks, optimizer, scheduler = setup_training(model, optim, parallel, FP32, steps_schedule(optim))
        # The optimizer holds main-param shards (not the model's tensors); with DP=1, one per parameter.
        by_part = {
            "vision_params": len(list(model.vision_model.parameters())),
            "in_vision_lr_groups": sum(len(g["params"]) for g in optimizer.param_groups if g["max_lr"] == 1e-4),
            "max_lrs": sorted({g["max_lr"] for g in optimizer.param_groups}),
        }
        for _ in range(2):
            train_step(chunks, optimizer, scheduler, _data(cfg).micro_batches(0, 1, 1), 1, SEQ, MBS)
        save_checkpoint(directory, 2, chunks, optimizer, scheduler)
        before = _groups(optimizer)
        _, model2 = _model(parallel)
        chunks2, optimizer2, scheduler2 = setup_training(model2, optim, parallel, FP32, steps_schedule(optim))
        load_checkpoint(directory, chunks2, optimizer2, scheduler2)
        return {"by_part": by_part, "before": before, "after": _groups(optimizer2)}
    finally:
        destroy_distributed()


def recompute_run(
    granularity: Optional[str], method: str = "uniform", num_layers: int = 1, vision: bool = False
) -> Dict:
    """Loss and gradients of one step (drop path on, so recompute must replay the RNG)."""
    parallel = ParallelConfig(
        recompute_granularity=granularity,
        recompute_method=method,
        recompute_num_layers=num_layers,
        recompute_vision=vision,
    )
    init_distributed(parallel, seed=3)
    try:
        cfg, model = _model(parallel, drop_path=0.3)
        chunks, optimizer, scheduler = setup_training(
            model, OptimConfig(), parallel, FP32, steps_schedule(OptimConfig())
        )
        model.train()
        result = train_step(chunks, optimizer, scheduler, _data(cfg).micro_batches(0, 1, 2), 2, SEQ, MBS)
        grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
        return {"loss": result.loss, "grads": grads}
    finally:
        destroy_distributed()


def nonfinite_step_is_skipped() -> Dict:
    parallel = ParallelConfig()
    init_distributed(parallel, seed=5)
    try:
        cfg, model = _model(parallel)
        chunks, optimizer, scheduler = setup_training(
            model,
            OptimConfig(warmup_steps=0, decay_steps=10),
            parallel,
            FP32,
            steps_schedule(OptimConfig(warmup_steps=0, decay_steps=10)),
        )
        data = _data(cfg).micro_batches(0, 1, 1)
        ok = train_step(chunks, optimizer, scheduler, data, 1, SEQ, MBS)
        with torch.no_grad():  # one poisoned weight: loss and every gradient upstream turn NaN
            model.language_model.decoder.layers[0].mlp.linear_fc2.weight[0, 0] = float("nan")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        steps_before = scheduler.num_steps
        bad = train_step(chunks, optimizer, scheduler, data, 1, SEQ, MBS)
        unchanged = all(
            torch.equal(p, before[n]) or n.endswith("linear_fc2.weight") for n, p in model.named_parameters()
        )
        return {
            "ok": ok.skipped,
            "bad": bad.skipped,
            "bad_loss": bad.loss,
            "unchanged": unchanged,
            "scheduler_moved": scheduler.num_steps != steps_before,
            "dp": parallel_state.get_data_parallel_world_size(),
        }
    finally:
        destroy_distributed()
