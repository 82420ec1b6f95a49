"""Wraps a model stage in megatron-core DDP and builds the (distributed) optimizer for it."""

from typing import List

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from sail_megatron.config import ParallelConfig, PrecisionConfig
from sail_megatron.config.optim import OptimConfig


def wrap_ddp(model: torch.nn.Module, parallel: ParallelConfig) -> DistributedDataParallel:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model_chunks: List[DistributedDataParallel], optim: OptimConfig, parallel: ParallelConfig,
                    precision: PrecisionConfig) -> MegatronOptimizer:
    config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=precision.dtype == "bf16", fp16=precision.dtype == "fp16",
        params_dtype=precision.torch_dtype, use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    # The pipeline schedules finish gradients (DP reduce, tied embeddings, per-token scaling) through this.
    for chunk in model_chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.grad_scale_func = optimizer.scale_loss
        chunk.config.no_sync_func = chunk.no_sync
        if parallel.overlap_param_gather:
            chunk.config.param_sync_func = chunk.start_param_sync
    return optimizer


def build_scheduler(optimizer: MegatronOptimizer, optim: OptimConfig) -> OptimizerParamScheduler:
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=max(optim.decay_steps, optim.warmup_steps + 1),
        lr_decay_style="cosine", start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=1, wd_incr_style="constant",
    )


def setup_training(model: torch.nn.Module, optim: OptimConfig, parallel: ParallelConfig, precision: PrecisionConfig):
    """DDP-wrapped model chunks, their optimizer and its schedule (freeze the model before this)."""
    chunks = [wrap_ddp(model, parallel)]
    optimizer = build_optimizer(chunks, optim, parallel, precision)
    return chunks, optimizer, build_scheduler(optimizer, optim)
