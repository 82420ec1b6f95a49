"""One optimizer step under megatron-core's pipeline schedules, with a per-token masked loss."""

import math
from dataclasses import dataclass
from functools import partial
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from sail_megatron.data.batch import Batch
from sail_megatron.platform import read_dist_env
from sail_megatron.training.guarded_step import guarded_step


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of the trained tokens' losses and their count. The schedules divide the gradients by the
    total count over micro-batches and data-parallel ranks (`calculate_per_token_loss`), so every
    trained token weighs the same however the samples were batched."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def packed_seq_params(batch: Batch) -> Optional[PackedSeqParams]:
    """THD parameters of a packed row: attention and RoPE restart at every sample boundary."""
    if not batch.is_packed:
        return None
    cu = batch.cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=batch.max_seqlen,
        max_seqlen_kv=batch.max_seqlen,
    )


def run_model(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The model on a batch already on its device: per-token losses on the last stage, hidden states for the
    next stage elsewhere."""
    return model(
        batch.tokens,
        batch.position_ids,
        None,
        pixel_values=batch.pixel_values,
        labels=batch.labels,
        packed_seq_params=packed_seq_params(batch),
        vision_share=batch.vision_share,
    )


def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
    batch = next(data_iterator).to(_device_of(model))
    return run_model(model, batch), partial(masked_token_loss, _agreed_loss_mask(batch))


def _agreed_loss_mask(batch: Batch) -> torch.Tensor:
    """The loss mask every tensor-parallel rank uses. Under a vision share each rank decodes only its own
    images and masks the samples whose images fail to decode; the ranks take the union of those masks."""
    if batch.vision_share is None or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return batch.loss_mask
    mask = batch.loss_mask.clone()
    dist.all_reduce(mask, op=dist.ReduceOp.MIN, group=parallel_state.get_tensor_model_parallel_group())
    return mask


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class StepResult:
    loss: float
    """Mean loss per trained token over the global batch."""
    trained_tokens: int
    grad_norm: float
    skipped: bool
    """The update was skipped for a NaN/Inf loss or gradient (counts towards `run.max_nonfinite_steps`)."""
    overflow: bool = False
    """fp16: the loss scaler found an overflow, skipped the update and backed off (expected early on)."""
    loss_scale: Optional[float] = None
    """fp16: the loss scale after this step."""
    updated: bool = True
    """The optimizer applied the update (the lr schedule advances only then)."""


def reduce_loss_reports(reports: List[dict]) -> torch.Tensor:
    """[loss sum, token count] over micro-batches and data-parallel ranks, on every rank."""
    total = torch.zeros(2, dtype=torch.float64, device=read_dist_env().device)
    for report in reports:
        total += report["lm loss"].to(total)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    # Only the last pipeline stage computed losses; share them along the pipeline.
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total


def train_step(
    model_chunks: List[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler,
    data_iterator: Iterator[Batch],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    """Forward and backward over `num_microbatches` micro-batches, then one guarded optimizer step
    (see `guarded_step`): a NaN/Inf loss or gradient skips the update and the lr step, and so does an
    fp16 loss-scaler overflow; the result says which. `scheduler` None: the caller advances the lr
    schedule after an applied update (a budget in tokens or samples moves it by what the step consumed)."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    reports = forward_backward(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    loss_sum, tokens = reduce_loss_reports(reports).tolist()
    outcome = guarded_step(optimizer, loss_finite=math.isfinite(loss_sum))
    if outcome.updated and scheduler is not None:
        scheduler.step(increment=1)
    return StepResult(
        loss=loss_sum / max(tokens, 1.0),
        trained_tokens=int(tokens),
        grad_norm=outcome.grad_norm,
        skipped=outcome.nonfinite,
        overflow=outcome.overflow,
        loss_scale=outcome.loss_scale,
        updated=outcome.updated,
    )
