"""Wraps a model stage in megatron-core DDP and builds the (distributed) optimizer and lr schedule."""

from typing import Dict, List

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from sail_megatron.config import ParallelConfig, PrecisionConfig
from sail_megatron.config.lr_schedule import LrSchedule
from sail_megatron.config.optim import OptimConfig
from sail_megatron.training.freezing import PART_MODULES


def keep_experts_apart(model: torch.nn.Module) -> int:
    """Mark every mixture-of-experts expert parameter as expert-parallel (`allreduce` False), as megatron-core
    marks them only when EP > 1. DDP then reduces their gradients over the expert data-parallel group (at
    EP 1 the data-parallel group itself: the same sums) and megatron's optimizer keeps them in an optimizer
    of their own at every EP size, so the optimizer state in a checkpoint has one structure (dense + expert)
    and moves between EP sizes. Returns how many parameters were marked."""
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, TEGroupedMLP

    marked = 0
    for module in model.modules():
        if isinstance(module, (SequentialMLP, TEGroupedMLP, GroupedMLP)):
            for param in module.parameters():
                param.allreduce = False
                marked += 1
    return marked


def wrap_ddp(model: torch.nn.Module, parallel: ParallelConfig) -> DistributedDataParallel:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the step skips non-finite gradients itself (training/guarded_step.py)
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def param_group_overrides(optim: OptimConfig) -> Dict[ParamKey, dict]:
    """No weight decay on biases and 1-D weights (megatron's standard rule, restated because passing
    overrides replaces it), and each part with its own lr gets its own max/min lr."""
    overrides = {
        ParamKey(name="*.bias", predicate=ParamPredicate(name="param_len_1", fn=lambda p: p.dim() == 1)): {
            "wd_mult": 0.0
        }
    }
    for part, lr in optim.part_lrs().items():
        if lr != optim.lr:
            # lr_mult is not applied by megatron-core's scheduler (max_lr/min_lr are); it is set because the
            # distributed optimizer tells param groups apart on load by (wd_mult, lr_mult, ...) alone, and
            # groups differing only in max_lr would get each other's lrs after a resume.
            overrides[ParamKey(name=f"*{PART_MODULES[part]}.*")] = {
                "max_lr": lr,
                "min_lr": optim.min_lr * lr / optim.lr,
                "lr_mult": lr / optim.lr,
            }
    return overrides


def build_optimizer(
    model_chunks: List[DistributedDataParallel],
    optim: OptimConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
) -> MegatronOptimizer:
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        params_dtype=precision.torch_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        initial_loss_scale=optim.initial_loss_scale,
        min_loss_scale=optim.min_loss_scale,
        loss_scale_window=optim.loss_scale_window,
        hysteresis=optim.loss_scale_hysteresis,
    )
    optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=param_group_overrides(optim))
    # The pipeline schedules finish gradients (DP reduce, tied embeddings, per-token scaling) through this.
    for chunk in model_chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.grad_scale_func = optimizer.scale_loss
        chunk.config.no_sync_func = chunk.no_sync
        if parallel.overlap_param_gather:
            chunk.config.param_sync_func = chunk.start_param_sync
    return optimizer


_DECAY_STYLE = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}


def build_scheduler(optimizer: MegatronOptimizer, optim: OptimConfig, schedule: LrSchedule) -> OptimizerParamScheduler:
    """megatron-core's scheduler: it reads each param group's max_lr/min_lr, so per-part lrs follow the
    same curve shape. Its 'steps' are the schedule's unit (steps, tokens or samples): the caller steps it
    by what each step consumed. On resume the recipe's values win over the checkpoint's (a stage can be
    lengthened or its lr changed; the driver logs what changed), only the progress is restored."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=schedule.warmup,
        lr_decay_steps=schedule.decay,
        lr_decay_style=_DECAY_STYLE[optim.schedule],
        wsd_decay_steps=schedule.wsd_decay if optim.schedule == "wsd" else None,
        lr_wsd_decay_style=optim.wsd_decay_style if optim.schedule == "wsd" else None,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


_COMPARED = {"max_lr": "lr", "min_lr": "min_lr", "lr_warmup_steps": "warmup", "lr_decay_steps": "decay"}


def schedule_changes(saved: dict, scheduler: OptimizerParamScheduler) -> List[str]:
    """What the recipe's schedule changes against a checkpoint's saved scheduler state ('decay: a -> b')."""
    now = scheduler.state_dict()
    return [
        f"{name}: {saved[key]:g} -> {now[key]:g}"
        for key, name in _COMPARED.items()
        if key in saved and key in now and saved[key] != now[key]
    ]


def part_learning_rates(scheduler: OptimizerParamScheduler, optim: OptimConfig) -> Dict[str, float]:
    """The current lr of each model part (for logging; frozen parts included: they would get this)."""
    return {
        part: scheduler.get_lr({"max_lr": lr, "min_lr": optim.min_lr * lr / optim.lr})
        for part, lr in optim.part_lrs().items()
    }


def setup_training(
    model: torch.nn.Module,
    optim: OptimConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    schedule: LrSchedule,
):
    """DDP-wrapped model chunks, their optimizer and its schedule (freeze the model before this)."""
    keep_experts_apart(model)
    chunks = [wrap_ddp(model, parallel)]
    optimizer = build_optimizer(chunks, optim, parallel, precision)
    return chunks, optimizer, build_scheduler(optimizer, optim, schedule)
