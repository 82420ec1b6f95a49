"""Optimizer and learning-rate schedule."""

from dataclasses import dataclass

from sail_megatron.config.errors import ConfigError


@dataclass
class OptimConfig:
    """AdamW under megatron-core's optimizer, warmup then cosine decay."""

    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    warmup_steps: int = 0
    decay_steps: int = 1000
    """Steps of the cosine decay from lr to min_lr after warmup."""

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("optim.lr", f"lr={self.lr}, min_lr={self.min_lr}", "use 0 <= min_lr <= lr, lr > 0")
        if self.warmup_steps < 0 or self.decay_steps < 1:
            raise ConfigError("optim.decay_steps", f"warmup={self.warmup_steps}, decay={self.decay_steps}",
                              "use warmup_steps >= 0 and decay_steps >= 1")
