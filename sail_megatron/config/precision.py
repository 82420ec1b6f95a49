"""Numeric precision: parameter dtype, mixed precision and Transformer Engine FP8."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

import torch

from sail_megatron.config.errors import ConfigError

if TYPE_CHECKING:
    from sail_megatron.config.parallel import ParallelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FP8_FORMATS = ("hybrid", "e4m3")
_FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
_MXFP8_MIN_CAPABILITY = (10, 0)  # MXFP8 tensor cores: Blackwell
TILE_BUCKET_RULES = ("pow2",)
"""Named rules for precision.vision_tile_buckets (besides an explicit list)."""


def pow2_buckets(max_tiles: int) -> Tuple[int, ...]:
    """1, 2, 4, ... below max_tiles, then max_tiles itself: the 'pow2' rule."""
    sizes, size = [], 1
    while size < max_tiles:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (max_tiles,)


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
    vision_tile_buckets: Union[List[int], str, None] = None
    """Static ViT shapes: every ViT call's tile count is padded up to the smallest of these tile counts with
    blank tiles, whose outputs are dropped before the projector, so the ViT runs at a few shapes only (what
    vision_cuda_graphs needs). Either an ascending list of tile counts whose largest is at least the most
    tiles a micro-batch may carry, data.max_tiles_per_pack x data.micro_batch_size (e.g. [4, 8, 16, 24, 40]),
    or 'pow2': 1, 2, 4, ... and that most itself as the largest. A text-only micro-batch's blank tile runs at
    the smallest bucket; under parallel.vision_parallel=data each rank pads its own share. null (default):
    every call at its own tile count. The padding is ViT work that MFU does not count."""
    vision_cuda_graphs: bool = False
    """Capture the ViT's forward and backward once per tile bucket as CUDA graphs (at its first training
    call) and replay them. Needs vision_tile_buckets and a CUDA GPU; the ViT must run whole on its rank
    (tensor-parallel size 1 or parallel.vision_parallel=data), on one pipeline stage's single micro-batch in
    flight (pipeline size 1), without recompute_vision or FP8 in the ViT, and with a trainable ViT without
    parallel.overlap_param_gather. Each bucket keeps its own input, output and (ViT trainable) weight-gradient
    buffers; the activations share one memory pool, sized by the largest bucket."""

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
        self.check_vision_graphs(has_cuda)
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

    def tile_buckets(self, max_tiles: Optional[int]) -> Optional[Tuple[int, ...]]:
        """The tile counts the ViT runs at, ascending (None: every call at its own count). max_tiles: the
        most tiles one ViT call gets (data.micro_batch_size x data.max_tiles_per_pack), where 'pow2' ends."""
        self._check_bucket_form()
        buckets = self.vision_tile_buckets
        if buckets is None:
            return None
        if isinstance(buckets, str):
            if max_tiles is None:
                raise ConfigError(
                    "precision.vision_tile_buckets",
                    f"{buckets!r} ends at data.max_tiles_per_pack, which this model build was not given",
                    "pass max_tiles to build_model, or list the tile counts",
                )
            return pow2_buckets(max_tiles)
        return tuple(buckets)

    def _check_bucket_form(self) -> None:
        buckets = self.vision_tile_buckets
        if buckets is None:
            return
        if isinstance(buckets, str):
            if buckets not in TILE_BUCKET_RULES:
                raise ConfigError(
                    "precision.vision_tile_buckets",
                    f"unknown rule {buckets!r}",
                    f"use {' or '.join(TILE_BUCKET_RULES)}, a list of tile counts, or null",
                )
            return
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
            raise ConfigError(
                "precision.vision_tile_buckets",
                f"{buckets!r} is not a list of positive tile counts",
                "list positive integers, e.g. [4, 8, 16, 32], or use pow2",
            )
        if list(buckets) != sorted(set(buckets)):
            raise ConfigError(
                "precision.vision_tile_buckets",
                f"{buckets} is not sorted ascending without repeats",
                f"write {sorted(set(buckets))}",
            )

    def check_vision_graphs(self, has_cuda: bool) -> None:
        """What precision alone decides about the tile buckets and the ViT's CUDA graphs."""
        self._check_bucket_form()
        if not self.vision_cuda_graphs:
            return
        if self.vision_tile_buckets is None:
            raise ConfigError(
                "precision.vision_cuda_graphs",
                "a CUDA graph replays fixed shapes, and without tile buckets every micro-batch gives the ViT a new one",
                "set precision.vision_tile_buckets (e.g. pow2) or turn vision_cuda_graphs off",
            )
        if not has_cuda:
            raise ConfigError(
                "precision.vision_cuda_graphs", "CUDA graphs need a CUDA GPU", "set precision.vision_cuda_graphs=false"
            )
        if self.fp8 is not None and self.fp8_vision:
            raise ConfigError(
                "precision.vision_cuda_graphs",
                "is not supported with precision.fp8_vision: Transformer Engine updates its FP8 scaling state "
                "outside the captured kernels, which torch's graph capture leaves out",
                "turn off precision.fp8_vision or precision.vision_cuda_graphs",
            )

    def check_vision_layout(
        self, parallel: "ParallelConfig", max_tiles: Optional[int] = None, vision_trains: Optional[bool] = None
    ) -> None:
        """The tile buckets and the ViT's CUDA graphs against the data, the parallel layout and the freezing;
        raises ConfigError. max_tiles: the most tiles one ViT call gets (data.micro_batch_size x
        data.max_tiles_per_pack); vision_trains: 'vision' in freeze.trainable. None skips what needs it."""
        buckets = self.tile_buckets(max_tiles) if max_tiles is not None else None
        if buckets is not None and buckets[-1] < max_tiles:
            raise ConfigError(
                "precision.vision_tile_buckets",
                f"the largest bucket, {buckets[-1]} tiles, is below the {max_tiles} tiles a micro-batch may carry "
                "(data.max_tiles_per_pack x data.micro_batch_size): such a micro-batch would fit no bucket",
                f"add {max_tiles} as the largest bucket, or lower data.max_tiles_per_pack",
            )
        if not self.vision_cuda_graphs:
            return
        refusals = [
            (
                parallel.vision_tensor_parallel_size > 1,
                f"the ViT is split over {parallel.vision_tensor_parallel_size} tensor-parallel ranks, and its "
                "all-reduces would be captured into the graphs",
                "set parallel.vision_parallel=data (the ViT whole on every tensor-parallel rank)",
            ),
            (
                parallel.pipeline_model_parallel_size > 1,
                "with pipeline parallelism the first stage runs several micro-batches' forward passes before their "
                "backward passes, and a graph holds one micro-batch's activations",
                "use parallel.pipeline_model_parallel_size=1 or turn vision_cuda_graphs off",
            ),
            (
                parallel.recompute_vision,
                "recomputing the ViT saves and restores RNG states in the backward pass, which a graph cannot "
                "capture (and a graph keeps its activations anyway)",
                "turn off parallel.recompute_vision or precision.vision_cuda_graphs",
            ),
            (
                bool(vision_trains) and parallel.overlap_param_gather,
                "with parallel.overlap_param_gather every module waits for its parameters' all-gather in a forward "
                "hook, and a graph replay runs no hooks: the trained ViT would read weights still being gathered",
                "turn off parallel.overlap_param_gather, or freeze the ViT (freeze.trainable without vision)",
            ),
        ]
        for refused, problem, fix in refusals:
            if refused:
                raise ConfigError("precision.vision_cuda_graphs", problem, fix)
