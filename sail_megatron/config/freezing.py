"""Which parts of the model train in a stage (SAIL-VL: projector only, then + vision, then all)."""

from dataclasses import dataclass, field
from typing import List

from sail_megatron.config.errors import ConfigError

MODEL_PARTS = ("vision", "projector", "language")
"""The model's parts, by the names recipes use (freezing, per-part lrs); `training/freezing.py` maps each
to its module in the model."""


@dataclass
class FreezeConfig:
    """Parts that receive gradients and optimizer state; every other part is frozen."""

    trainable: List[str] = field(default_factory=lambda: list(MODEL_PARTS))
    """Subset of ['vision', 'projector', 'language']: ['projector'] for pretrain-alignment,
    ['vision', 'projector'] for pretrain-advance, all three for SFT."""

    def validate(self) -> None:
        unknown = [p for p in self.trainable if p not in MODEL_PARTS]
        if unknown:
            raise ConfigError("freeze.trainable", f"unknown parts {unknown}", f"use names from {list(MODEL_PARTS)}")
        if len(set(self.trainable)) != len(self.trainable):
            raise ConfigError("freeze.trainable", f"{self.trainable} names a part twice", "list each part once")
        if not self.trainable:
            raise ConfigError("freeze.trainable", "nothing would train", "name at least one part")
