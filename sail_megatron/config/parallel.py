"""How a model is laid out over processes: tensor, pipeline and data parallelism."""

from dataclasses import dataclass
from typing import Optional

from sail_megatron.config.errors import ConfigError
from sail_megatron.config.model import ModelConfig

VISION_LAYOUTS = ("tensor", "data")


@dataclass
class ParallelConfig:
    """Parallel layout; data parallelism is whatever the world size leaves over."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    """Shard LayerNorm/dropout activations of the language model along the sequence (needs TP > 1 and
    Transformer Engine layers)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce with the backward pass (GPU clusters)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward (GPU clusters)."""
    recompute_granularity: Optional[str] = None
    """Activation recomputation in the language model: None (keep all activations), "selective"
    (recompute attention's core only: cheap, saves the s^2-sized activations) or "full" (whole layers)."""
    recompute_method: str = "uniform"
    """full only: "uniform" checkpoints groups of recompute_num_layers layers; "block" recomputes the
    first recompute_num_layers layers of each pipeline stage and keeps the rest."""
    recompute_num_layers: int = 1
    vision_parallel: str = "tensor"
    """Where the vision encoder and projector run. "tensor": split over the tensor-parallel ranks like the
    language model (an all-reduce after every ViT attention and MLP block). "data": whole on every
    tensor-parallel rank, each encoding (and decoding) its own share of the micro-batch's images, balanced
    by tiles; the projector outputs are then exchanged and the vision gradients summed over the
    tensor-parallel ranks. Checkpoints are the same either way."""
    recompute_vision: bool = False
    """Recompute every ViT layer in the backward pass (many tiles per micro-batch make the ViT's
    activations the largest; only useful when the ViT trains)."""

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def vision_tensor_parallel_size(self) -> int:
        """How many ranks split each vision layer: TP under "tensor", 1 under "data"."""
        return self.tensor_model_parallel_size if self.vision_parallel == "tensor" else 1

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def validate(self, model: ModelConfig, world_size: int) -> None:
        """Check the layout against the model and the number of processes; raises ConfigError."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"parallel.{name}", f"must be a positive integer, got {value!r}", "set it to 1 or more"
                )
        if world_size < 1 or world_size % (tp * pp):
            raise ConfigError(
                "parallel",
                f"world size {world_size} is not divisible by TP*PP = {tp}*{pp}",
                f"launch a multiple of {tp * pp} processes or change TP/PP",
            )
        if self.vision_parallel not in VISION_LAYOUTS:
            raise ConfigError(
                "parallel.vision_parallel",
                f"unknown layout {self.vision_parallel!r}",
                f"use one of {', '.join(VISION_LAYOUTS)}",
            )
        lang, vision = model.language, model.vision
        checks = [
            ("model.language.num_attention_heads", lang.num_attention_heads),
            ("model.language.num_query_groups", lang.num_query_groups),
            ("model.language.ffn_hidden_size", lang.ffn_hidden_size),
        ]
        if self.vision_tensor_parallel_size > 1:
            checks += [
                ("model.vision.num_attention_heads", vision.num_attention_heads),
                ("model.vision.ffn_hidden_size", vision.ffn_hidden_size),
            ]
        for name, value in checks:
            if value % tp:
                raise ConfigError(
                    name,
                    f"{value} is not divisible by tensor_model_parallel_size={tp}",
                    "choose a TP size that divides it",
                )
        if lang.num_layers % pp:
            raise ConfigError(
                "parallel.pipeline_model_parallel_size",
                f"{lang.num_layers} language layers do not split evenly over {pp} stages",
                "choose a PP size that divides model.language.num_layers",
            )
        if self.sequence_parallel and tp == 1:
            raise ConfigError(
                "parallel.sequence_parallel", "needs tensor_model_parallel_size > 1", "turn it off or raise TP"
            )
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ConfigError(
                "parallel.recompute_granularity",
                f"unknown value {self.recompute_granularity!r}",
                "use null, selective or full",
            )
        if self.recompute_method not in ("uniform", "block"):
            raise ConfigError(
                "parallel.recompute_method", f"unknown value {self.recompute_method!r}", "use uniform or block"
            )
        per_stage = lang.num_layers // pp
        if self.recompute_granularity == "full" and not 1 <= self.recompute_num_layers <= per_stage:
            raise ConfigError(
                "parallel.recompute_num_layers",
                f"{self.recompute_num_layers} with {per_stage} language layers per pipeline stage",
                f"use 1..{per_stage}",
            )

    def check_layer_backend(self, layer_backend: str) -> None:
        """The layout against the layer implementation ('te' or 'local'); raises ConfigError."""
        # megatron-core's local spec builds RMSNorm as WrappedTorchNorm, with or without apex, and
        # WrappedTorchNorm asserts that sequence parallelism is off.
        if self.sequence_parallel and layer_backend == "local":
            raise ConfigError(
                "parallel.sequence_parallel",
                "megatron-core's local layers use torch norms, which cannot shard activations along the sequence",
                "use Transformer Engine layers (precision.layers=auto or te, on a CUDA GPU with "
                "transformer-engine installed) or set parallel.sequence_parallel=false",
            )
