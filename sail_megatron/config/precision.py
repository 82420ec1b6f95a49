"""Numeric precision: parameter dtype, mixed precision and Transformer Engine FP8."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from sail_megatron.config.errors import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FP8_FORMATS = ("hybrid", "e4m3")
_FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
_MXFP8_MIN_CAPABILITY = (10, 0)  # MXFP8 tensor cores: Blackwell


@dataclass
class PrecisionConfig:
    """Training precision. bf16 on GPUs. The CPU runs fp32 by default (fast there) and also bf16/fp16,
    through the very mixed-precision optimizer branches a GPU run takes: that is how the GPU recipes'
    precision is trained and tested without a GPU."""

    dtype: str = "bf16"
    """Compute dtype of the model: 'bf16', 'fp16' or 'fp32' (main weights and grads stay fp32)."""
    fp8: Optional[str] = None
    """Transformer Engine FP8 format for linear layers: None, 'hybrid' (E4M3 fwd / E5M2 bwd) or 'e4m3'."""
    fp8_recipe: str = "delayed"
    """TE scaling recipe: 'delayed', 'tensorwise', 'mxfp8' (Blackwell) or 'blockwise'."""
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_vision: bool = False
    """Also run the ViT's linear layers in FP8 (off by default: the ViT is small and precision-sensitive)."""
    layers: str = "auto"
    """Layer implementation: 'auto' (Transformer Engine with CUDA + TE, else megatron-core's local
    layers), 'te' or 'local' (e.g. to measure one against the other)."""

    def layer_backend(self, backends) -> str:
        return self.resolve_layers(backends.cuda, backends.transformer_engine)

    def resolve_layers(self, has_cuda: bool, has_te: bool) -> str:
        """'te' or 'local': what `layers` means on a machine with these backends."""
        if self.layers != "auto":
            return self.layers
        return "te" if has_cuda and has_te else "local"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def validate(self, has_cuda: bool, has_te: bool, cuda_capability: Optional[Tuple[int, int]] = None) -> None:
        """cuda_capability: the GPU's (major, minor), as Backends.cuda_capability; None skips the checks
        that need it."""
        if self.dtype not in _DTYPES:
            raise ConfigError("precision.dtype", f"unknown dtype {self.dtype!r}", f"use one of {sorted(_DTYPES)}")
        if self.layers not in ("auto", "te", "local"):
            raise ConfigError("precision.layers", f"unknown value {self.layers!r}", "use auto, te or local")
        if self.layers == "te" and not (has_cuda and has_te):
            raise ConfigError(
                "precision.layers",
                "te layers need Transformer Engine and a CUDA GPU",
                "use precision.layers=auto or local",
            )
        if self.fp8 is not None and self.layers == "local":
            raise ConfigError(
                "precision.fp8", "FP8 runs in Transformer Engine layers", "set precision.layers=auto or te"
            )
        if self.fp8 is None:
            return
        if self.fp8 not in _FP8_FORMATS:
            raise ConfigError("precision.fp8", f"unknown FP8 format {self.fp8!r}", f"use one of {_FP8_FORMATS} or null")
        if self.fp8_recipe not in _FP8_RECIPES:
            raise ConfigError(
                "precision.fp8_recipe", f"unknown recipe {self.fp8_recipe!r}", f"use one of {_FP8_RECIPES}"
            )
        if not (has_cuda and has_te):
            raise ConfigError(
                "precision.fp8",
                "FP8 needs Transformer Engine and a CUDA GPU",
                "install transformer-engine (pip install 'sail-megatron[te]') or set precision.fp8=null",
            )
        if self.dtype == "fp32":
            raise ConfigError("precision.fp8", "FP8 runs inside bf16/fp16 mixed precision", "set precision.dtype=bf16")
        self.check_cuda_capability(cuda_capability)

    def check_cuda_capability(self, cuda_capability: Optional[Tuple[int, int]]) -> None:
        """The FP8 recipe against the GPU (None: unknown, not checked)."""
        if self.fp8 is None or cuda_capability is None:
            return
        if self.fp8_recipe == "mxfp8" and tuple(cuda_capability) < _MXFP8_MIN_CAPABILITY:
            major, minor = cuda_capability
            raise ConfigError(
                "precision.fp8_recipe",
                f"mxfp8 needs a Blackwell GPU (compute capability 10.0 or newer), this one is {major}.{minor}",
                "use precision.fp8_recipe=delayed or tensorwise",
            )
