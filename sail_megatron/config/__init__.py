"""Typed, validated configuration dataclasses."""

from sail_megatron.config.errors import ConfigError
from sail_megatron.config.freezing import MODEL_PARTS, FreezeConfig
from sail_megatron.config.model import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig
from sail_megatron.config.parallel import ParallelConfig
from sail_megatron.config.precision import PrecisionConfig

__all__ = [
    "ConfigError",
    "FreezeConfig",
    "MODEL_PARTS",
    "LanguageConfig",
    "ModelConfig",
    "ProjectorConfig",
    "VisionConfig",
    "ParallelConfig",
    "PrecisionConfig",
]
