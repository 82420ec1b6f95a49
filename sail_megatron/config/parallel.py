"""How a model is laid out over processes: tensor, pipeline, expert and data parallelism."""

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
    expert_model_parallel_size: int = 1
    """Mixture-of-experts language models: ranks the experts of every MoE layer are split over (each holds
    num_experts / EP whole experts; tokens travel to their experts by all-to-all). The expert ranks are
    taken from the data-parallel ranks (with TP, from TP x DP), so the world size stays TP x PP x DP and
    megatron-core reduces expert gradients over the ranks that hold the same experts."""
    expert_tensor_parallel_size: Optional[int] = None
    """Ranks each expert's FFN is split over; null: the tensor-parallel size (megatron-core's default)."""

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def vision_tensor_parallel_size(self) -> int:
        """How many ranks split each vision layer: TP under "tensor", 1 under "data"."""
        return self.tensor_model_parallel_size if self.vision_parallel == "tensor" else 1

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    @property
    def expert_tensor_size(self) -> int:
        """Ranks one expert is split over (the tensor-parallel size unless stated)."""
        etp = self.expert_tensor_parallel_size
        return self.tensor_model_parallel_size if etp is None else etp

    def expert_data_parallel_size(self, world_size: int) -> int:
        """Ranks that hold the same experts (their gradients are reduced over these)."""
        return world_size // (
            self.expert_tensor_size * self.expert_model_parallel_size * self.pipeline_model_parallel_size
        )

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
        ]
        if not lang.is_moe:  # a mixture of experts has no dense MLP (its experts are checked against ETP)
            checks.append(("model.language.ffn_hidden_size", lang.ffn_hidden_size))
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
        self._validate_experts(model, world_size)
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

    def _validate_experts(self, model: ModelConfig, world_size: int) -> None:
        """Expert parallelism against the model and the world size, as megatron-core's
        initialize_model_parallel and MoE layers require it."""
        ep, etp, lang = self.expert_model_parallel_size, self.expert_tensor_parallel_size, model.language
        for name, value in (("expert_model_parallel_size", ep), ("expert_tensor_parallel_size", etp)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(
                    f"parallel.{name}", f"must be a positive integer, got {value!r}", "set it to 1 or more"
                )
        if not lang.is_moe:
            if ep > 1 or etp is not None:
                name = "expert_model_parallel_size" if ep > 1 else "expert_tensor_parallel_size"
                raise ConfigError(
                    f"parallel.{name}",
                    f"is {getattr(self, name)} but the language model ({lang.arch}) has no experts",
                    "remove it (expert_model_parallel_size 1, expert_tensor_parallel_size null), or use a "
                    "mixture-of-experts model (model_preset sail-vl2-moe)",
                )
            return
        if lang.num_experts % ep:
            raise ConfigError(
                "parallel.expert_model_parallel_size",
                f"{lang.num_experts} experts (model.language.num_experts) do not split over {ep} expert ranks",
                "choose an expert-parallel size that divides the number of experts",
            )
        experts_layout = self.expert_tensor_size * ep * self.pipeline_model_parallel_size
        if world_size % experts_layout:
            raise ConfigError(
                "parallel.expert_model_parallel_size",
                f"world size {world_size} is not divisible by expert TP x EP x PP = "
                f"{self.expert_tensor_size}*{ep}*{self.pipeline_model_parallel_size}",
                f"launch a multiple of {experts_layout} processes or change the expert-parallel size",
            )
        if lang.moe_ffn_hidden_size % self.expert_tensor_size:
            raise ConfigError(
                "model.language.moe_ffn_hidden_size",
                f"{lang.moe_ffn_hidden_size} is not divisible by the expert tensor-parallel size "
                f"{self.expert_tensor_size}",
                "choose parallel.expert_tensor_parallel_size (default: the TP size) that divides it",
            )
        if self.tensor_model_parallel_size > 1 and not self.sequence_parallel:
            raise ConfigError(
                "parallel.sequence_parallel",
                "is off, but megatron-core trains mixture-of-experts layers under tensor parallelism only with "
                "sequence parallelism (its MoE layer refuses the training step otherwise)",
                "set parallel.sequence_parallel=true (Transformer Engine layers), or use TP 1 and "
                "parallel.expert_model_parallel_size to split the experts",
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
