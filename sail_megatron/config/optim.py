"""Optimizer and learning-rate schedule."""

import math
from dataclasses import dataclass
from typing import Dict, Optional

from sail_megatron.config.errors import ConfigError
from sail_megatron.config.freezing import MODEL_PARTS as PARTS

SCHEDULES = ("cosine", "wsd", "constant")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclass
class OptimConfig:
    """AdamW under megatron-core's (distributed) optimizer; linear warmup, then the chosen schedule."""

    lr: float = 1e-4
    """Peak learning rate of every part without its own `<part>_lr`."""
    min_lr: float = 1e-6
    """Floor of the decay; a part with its own lr decays to min_lr scaled by <part>_lr / lr."""
    vision_lr: Optional[float] = None
    """Peak lr of the vision encoder (SAIL-VL trains the ViT slower than the projector); None: lr."""
    projector_lr: Optional[float] = None
    language_lr: Optional[float] = None
    weight_decay: float = 0.05
    """Decoupled weight decay; never applied to biases and norm weights."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    schedule: str = "cosine"
    """cosine: warmup then cosine to min_lr at the decay's end; wsd: warmup, hold lr, then anneal to min_lr
    over the last wsd_decay of the decay; constant: warmup then hold. The lengths are resolved against
    the stage's budget (config/lr_schedule.py)."""
    warmup_steps: Optional[int] = None
    """Linear warmup in optimizer steps (stages budgeted in steps only); null with warmup_fraction."""
    warmup_fraction: Optional[float] = None
    """Linear warmup as a fraction of the stage's budget, in its unit (steps, tokens or samples);
    neither set: no warmup."""
    decay_steps: Optional[int] = None
    """Step at which the lr reaches min_lr (counted from step 0, warmup included; steps budgets only)."""
    decay_fraction: Optional[float] = None
    """The same as a fraction of the budget; neither set: the decay lasts the whole budget."""
    wsd_decay_steps: Optional[int] = None
    """wsd only: length of the final anneal in steps (steps budgets only)."""
    wsd_decay_fraction: Optional[float] = None
    """wsd only: length of the final anneal as a fraction of the budget."""
    wsd_decay_style: str = "linear"
    initial_loss_scale: float = 2.0**32
    """fp16 only: the dynamic loss scale to start from (megatron's default). The first steps overflow
    and halve it until the gradients fit; those steps are skipped and logged, not counted as faults."""
    min_loss_scale: float = 1.0
    """fp16 only: the scale never drops below this; overflows at this scale count as non-finite steps."""
    loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the scale doubles."""
    loss_scale_hysteresis: int = 2
    """fp16 only: overflows tolerated before the scale is halved."""

    def part_lrs(self) -> Dict[str, float]:
        """Peak lr per model part."""
        return {part: getattr(self, f"{part}_lr") or self.lr for part in PARTS}

    def validate(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"optim.{name}", f"must be a finite number, got {value}", "set a finite value")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("optim.lr", f"lr={self.lr}, min_lr={self.min_lr}", "use 0 <= min_lr <= lr, lr > 0")
        for part in PARTS:
            value = getattr(self, f"{part}_lr")
            if value is not None and value <= 0:
                raise ConfigError(f"optim.{part}_lr", f"must be > 0, got {value}", "set a positive lr or null")
        if self.schedule not in SCHEDULES:
            raise ConfigError("optim.schedule", f"unknown schedule {self.schedule!r}", f"use one of {SCHEDULES}")
        if self.schedule == "wsd":
            if self.wsd_decay_style not in WSD_DECAY_STYLES:
                raise ConfigError(
                    "optim.wsd_decay_style", f"unknown style {self.wsd_decay_style!r}", f"use one of {WSD_DECAY_STYLES}"
                )
        for name in ("warmup_steps", "decay_steps", "wsd_decay_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}", f"must be >= 0, got {getattr(self, name)}", "use a step count")
        for name in ("warmup_fraction", "decay_fraction", "wsd_decay_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"optim.{name}", f"must lie in [0, 1], got {value}", "give a fraction of the budget")
        if not 0 < self.min_loss_scale <= self.initial_loss_scale:
            raise ConfigError(
                "optim.min_loss_scale",
                f"{self.min_loss_scale} with initial_loss_scale {self.initial_loss_scale}",
                "use 0 < min_loss_scale <= initial_loss_scale",
            )
        if self.loss_scale_window < 1 or self.loss_scale_hysteresis < 1:
            raise ConfigError(
                "optim.loss_scale_window",
                f"window {self.loss_scale_window}, hysteresis {self.loss_scale_hysteresis}",
                "use loss_scale_window >= 1 and loss_scale_hysteresis >= 1",
            )
        if self.clip_grad < 0:
            raise ConfigError("optim.clip_grad", f"must be >= 0, got {self.clip_grad}", "use 0 to disable clipping")
