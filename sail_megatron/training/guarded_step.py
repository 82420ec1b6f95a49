"""megatron-core's optimizer step, split so that a NaN/Inf gradient skips the update.

megatron's `optimizer.step()` checks for inf/NaN only when a loss scaler exists (fp16); in bf16 and
fp32 it clips and applies whatever the gradients hold. The gradient norm it computes anyway is global
(reduced over every rank the optimizer spans), so checking it costs nothing extra and every rank takes
the same decision. The steps below are the ones `MixedPrecisionOptimizer.step` and
`ChainedOptimizer.step` take in megatron-core 0.16.1, with the check between norm and update.
"""

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32


@dataclass
class StepOutcome:
    updated: bool
    grad_norm: float
    overflow: bool = False
    """fp16: the loss scaler found inf/NaN gradients and backed off (not counted as a fault)."""
    nonfinite: bool = False
    """A NaN/Inf loss or gradient the run cannot recover from by itself (counted as a fault)."""
    loss_scale: Optional[float] = None


def _parts(optimizer: MegatronOptimizer) -> List[MegatronOptimizer]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _grad_scalers(optimizer: MegatronOptimizer) -> list:
    return [s for s in (getattr(o, "grad_scaler", None) for o in _parts(optimizer)) if s is not None]


def loss_scale(optimizer: MegatronOptimizer) -> Optional[float]:
    scalers = _grad_scalers(optimizer)
    return float(scalers[0].scale) if scalers else None


def _scale_at_minimum(optimizer: MegatronOptimizer) -> bool:
    """An fp16 scaler that cannot back off further: overflows now mean broken gradients."""
    return any(float(s.scale) <= float(getattr(s, "min_scale", 0.0)) for s in _grad_scalers(optimizer))


def _clip(optimizer: MegatronOptimizer, grad_norm: float) -> None:
    for part in _parts(optimizer):
        if getattr(part, "is_stub_optimizer", False) or part.config.clip_grad <= 0.0:
            continue
        params = part.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(
                params,
                max_norm=part.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )


@torch.no_grad()
def guarded_step(optimizer: MegatronOptimizer, loss_finite: bool) -> StepOutcome:
    """Collective (every rank of the model calls it). `loss_finite` must be the same on every rank."""
    # Copies grads to the main grads; with fp16 also unscales, checks for overflow and updates the scale.
    if optimizer.prepare_grads():
        return StepOutcome(
            updated=False,
            grad_norm=float("nan"),
            overflow=True,
            nonfinite=_scale_at_minimum(optimizer),
            loss_scale=loss_scale(optimizer),
        )
    grad_norm = float(optimizer.get_grad_norm())
    if not (loss_finite and math.isfinite(grad_norm)):
        return StepOutcome(updated=False, grad_norm=grad_norm, nonfinite=True, loss_scale=loss_scale(optimizer))
    _clip(optimizer, grad_norm)
    updated = bool(optimizer.step_with_ready_grads())
    return StepOutcome(updated=updated, grad_norm=grad_norm, loss_scale=loss_scale(optimizer))
