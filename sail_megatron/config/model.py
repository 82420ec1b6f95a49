"""Typed configs for the three parts of a SAIL-VL model.

Defaults are InternViT-300M-448px, the SAIL-VL projector and Qwen2.5-1.5B (docs/design.md, The model).
What distinguishes one encoder or decoder family from another is a fixed set of architecture facts
(`VISION_ARCHS`, `LANGUAGE_ARCHS`): a config names its family and carries only the sizes.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional

from sail_megatron.config.errors import ConfigError


@dataclass(frozen=True)
class VisionArch:
    """What a vision-encoder family is, apart from its sizes."""

    normalization: str
    """'LayerNorm' (weight and bias) or 'RMSNorm' (weight only), for every norm of the encoder."""
    bias: bool
    """Biases on qkv, the attention output and the MLP linears."""
    gated_mlp: bool
    """SwiGLU `fc2(silu(fc1 x) * fc3 x)` instead of `fc2(gelu(fc1 x))`."""
    cls_token: bool
    """A learned CLS token before the patches (dropped before pixel shuffle)."""
    layer_scale: bool
    """Per-channel scales ls1/ls2 on the residual branches (and stochastic depth)."""
    patch_norm: bool
    """A norm right after the patch embedding."""
    final_norm: bool
    """A norm after the last layer, applied when `select_layer` is -1 (the encoder's own output)."""


VISION_ARCHS: Dict[str, VisionArch] = {
    # InternViT-300M (InternVL, SAIL-VL-2B/8B).
    "internvit": VisionArch("LayerNorm", True, False, True, True, False, False),
    # AIMv2 (apple/ml-aim) and SAILViT, its continued training (SAIL-VL-1.5, 1.6, SAIL-VL2).
    "aimv2": VisionArch("RMSNorm", False, True, False, False, True, True),
}


@dataclass(frozen=True)
class LanguageArch:
    """What a decoder family is, apart from its sizes (all: RMSNorm, SwiGLU, RoPE, GQA)."""

    qkv_bias: bool
    qk_layernorm: bool
    """RMSNorm over each head of q and k before RoPE."""
    hf_architecture: str
    """The transformers class of a standalone checkpoint."""
    hf_model_type: str
    moe: bool = False
    """Every decoder layer's MLP is a mixture of experts (a router picks the top-k of `num_experts` SwiGLU
    experts per token and sums their outputs weighted by the routing probabilities); no shared expert."""


LANGUAGE_ARCHS: Dict[str, LanguageArch] = {
    "qwen2": LanguageArch(True, False, "Qwen2ForCausalLM", "qwen2"),  # Qwen2 and Qwen2.5
    "qwen3": LanguageArch(False, True, "Qwen3ForCausalLM", "qwen3"),  # dense Qwen3
    # Qwen3-MoE (Qwen3-30B-A3B, SAIL-VL2's MoE model): Qwen3's attention, every MLP a mixture of experts.
    "qwen3_moe": LanguageArch(False, True, "Qwen3MoeForCausalLM", "qwen3_moe", moe=True),
}


def _check_arch(value: str, known: Dict, name: str) -> None:
    if value not in known:
        raise ConfigError(name, f"unknown architecture {value!r}", f"use one of {sorted(known)}")


@dataclass
class VisionConfig:
    """Vision encoder: InternViT or AIMv2/SAILViT (`arch`)."""

    arch: str = "internvit"
    """Encoder family: 'internvit' or 'aimv2' (also SAILViT); see VISION_ARCHS."""
    hidden_size: int = 1024
    """Width of the ViT residual stream."""
    num_layers: int = 24
    """Layers in the released encoder (the checkpoint holds all of them)."""
    num_attention_heads: int = 16
    ffn_hidden_size: int = 4096
    image_size: int = 448
    """Side of one square tile in pixels."""
    patch_size: int = 14
    layernorm_epsilon: float = 1e-6
    select_layer: int = -1
    """Which hidden state feeds the projector, Python-indexed over [embeddings, layer 1, ..., layer N]
    as in InternVL (-1: last layer; SAIL-VL uses -4). Layers after it are not built."""
    drop_path_rate: float = 0.0
    """Stochastic depth, rising linearly to this value over the built layers (InternViT: 0.1)."""
    layer_scale_init: float = 0.1
    """Initial value of the layer-scale vectors ls1/ls2 for freshly initialized encoders (InternViT)."""

    @property
    def spec(self) -> VisionArch:
        return VISION_ARCHS[self.arch]

    @property
    def num_positions(self) -> int:
        """Learned position embeddings: one per patch, plus the CLS token where there is one."""
        return self.num_patches + (1 if self.spec.cls_token else 0)

    @property
    def applies_final_norm(self) -> bool:
        """The encoder's final norm is part of the features only when they are its own output."""
        return self.spec.final_norm and self.select_layer == -1

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_built_layers(self) -> int:
        """Layers up to and including `select_layer`."""
        return self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer

    def validate(self, prefix: str = "model.vision") -> None:
        _check_arch(self.arch, VISION_ARCHS, f"{prefix}.arch")
        _positive(
            self,
            prefix,
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "ffn_hidden_size",
            "image_size",
            "patch_size",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{prefix}.hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}",
                "choose a hidden size that is a multiple of the head count",
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{prefix}.image_size",
                f"{self.image_size} is not a multiple of patch_size={self.patch_size}",
                "use a tile size made of whole patches",
            )
        if not 1 <= self.num_built_layers <= self.num_layers:
            raise ConfigError(
                f"{prefix}.select_layer",
                f"{self.select_layer} leaves {self.num_built_layers} of {self.num_layers} layers",
                f"use a value in [1, {self.num_layers}] or [{-self.num_layers}, -1]",
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(
                f"{prefix}.drop_path_rate",
                f"{self.drop_path_rate} is outside [0, 1)",
                "use 0.0 to disable or a small rate such as 0.1",
            )
        if self.drop_path_rate and not self.spec.layer_scale:
            raise ConfigError(
                f"{prefix}.drop_path_rate",
                f"is {self.drop_path_rate} but {self.arch} encoders have no stochastic depth",
                "set it to 0.0",
            )


@dataclass
class ProjectorConfig:
    """Pixel shuffle followed by LayerNorm -> Linear -> GELU -> Linear (InternVL `mlp1`)."""

    downsample_ratio: float = 0.5
    """Pixel-shuffle scale: 0.5 merges 2x2 patches, so 1024 patches become 256 tokens."""
    ps_version: str = "v2"
    """'v1' leaves the shuffled grid transposed (as early InternVL checkpoints were trained), 'v2' does not."""
    layernorm_epsilon: float = 1e-5

    @property
    def merge_factor(self) -> int:
        """Patches merged into one token along each side."""
        return round(1 / self.downsample_ratio)

    def validate(self, vision: VisionConfig, prefix: str = "model.projector") -> None:
        if not 0 < self.downsample_ratio <= 1:
            raise ConfigError(
                f"{prefix}.downsample_ratio",
                f"{self.downsample_ratio} is outside (0, 1]",
                "use 0.5 (SAIL-VL) or another 1/k",
            )
        if self.ps_version not in ("v1", "v2"):
            raise ConfigError(f"{prefix}.ps_version", f"unknown version {self.ps_version!r}", "use 'v1' or 'v2'")
        if abs(self.merge_factor * self.downsample_ratio - 1.0) > 1e-9:
            raise ConfigError(
                f"{prefix}.downsample_ratio",
                f"{self.downsample_ratio} is not 1/k for an integer k",
                "use 0.5 (SAIL-VL) or another 1/k",
            )
        grid = vision.image_size // vision.patch_size
        if grid % self.merge_factor:
            raise ConfigError(
                f"{prefix}.downsample_ratio",
                f"the {grid}x{grid} patch grid does not split into {self.merge_factor}x{self.merge_factor} blocks",
                "choose image_size/patch_size divisible by 1/downsample_ratio",
            )


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron pads the vocabulary so every TP shard is equal and aligned (export strips the padding)."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


@dataclass
class LanguageConfig:
    """Decoder: Qwen2/Qwen2.5, dense Qwen3 or Qwen3-MoE (`arch`)."""

    arch: str = "qwen2"
    """Decoder family: 'qwen2' (also Qwen2.5), 'qwen3' (dense) or 'qwen3_moe'; see LANGUAGE_ARCHS."""
    hidden_size: int = 1536
    num_layers: int = 28
    num_attention_heads: int = 12
    num_query_groups: int = 2
    """Key/value heads (GQA)."""
    ffn_hidden_size: int = 8960
    """Width of the dense SwiGLU MLP (Qwen3-MoE: its config's `intermediate_size`, which no layer uses when
    every layer is an MoE layer; kept so the Hugging Face config travels unchanged)."""
    vocab_size: int = 151936
    """Rows of the released embedding (Megatron may pad it for TP; export strips the padding)."""
    rope_theta: float = 1_000_000.0
    norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = False
    """SAIL-VL-2B has an untied lm_head; read `tie_word_embeddings` from the HF config.json."""
    max_position_embeddings: int = 32768
    make_vocab_size_divisible_by: int = 128
    head_dim: Optional[int] = None
    """Width of one attention head when it is not hidden_size / num_attention_heads (Qwen3 states it)."""
    num_experts: Optional[int] = None
    """Mixture-of-experts families only: routed experts per layer (Qwen3-MoE `num_experts`); null when dense."""
    moe_ffn_hidden_size: Optional[int] = None
    """FFN width of one expert (Qwen3-MoE `moe_intermediate_size`)."""
    moe_router_topk: Optional[int] = None
    """Experts each token is routed to (Qwen3-MoE `num_experts_per_tok`)."""
    moe_norm_topk_prob: bool = True
    """Renormalize the top-k routing probabilities to sum to one (Qwen3-MoE `norm_topk_prob`); false keeps
    the softmax over all experts at the chosen ones."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing (Switch) loss weight, added per MoE layer over each micro-batch's tokens (Qwen3-MoE
    `router_aux_loss_coef`, 0.001); 0 turns it off."""
    moe_z_loss_coeff: Optional[float] = None
    """Router z-loss weight (ST-MoE: the squared log-sum-exp of the router logits); null turns it off."""

    @property
    def spec(self) -> LanguageArch:
        return LANGUAGE_ARCHS[self.arch]

    @property
    def is_moe(self) -> bool:
        return self.arch in LANGUAGE_ARCHS and self.spec.moe

    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Rows of the embedding and output layer as megatron builds them under this TP."""
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tensor_parallel_size)

    def validate(self, prefix: str = "model.language") -> None:
        _check_arch(self.arch, LANGUAGE_ARCHS, f"{prefix}.arch")
        _positive(
            self,
            prefix,
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_query_groups",
            "ffn_hidden_size",
            "vocab_size",
            "make_vocab_size_divisible_by",
        )
        if self.head_dim is not None:
            _positive(self, prefix, "head_dim")
        elif self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{prefix}.hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}",
                "fix the head count or set head_dim",
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"{prefix}.num_query_groups",
                f"{self.num_attention_heads} heads do not split into {self.num_query_groups} groups",
                "use a divisor of num_attention_heads",
            )
        self._validate_moe(prefix)

    def _validate_moe(self, prefix: str) -> None:
        if not self.is_moe:
            if self.num_experts is not None:
                raise ConfigError(
                    f"{prefix}.num_experts",
                    f"is {self.num_experts} but arch {self.arch!r} is a dense decoder",
                    "use arch qwen3_moe for a mixture-of-experts model, or set num_experts to null",
                )
            return
        for name, what in (
            ("num_experts", "the routed experts per layer"),
            ("moe_ffn_hidden_size", "the FFN width of one expert"),
            ("moe_router_topk", "the experts per token"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"{prefix}.{name}",
                    f"must be a positive integer for arch {self.arch!r}, got {value!r}",
                    f"set it to {what} (Qwen3-30B-A3B: num_experts 128, moe_ffn_hidden_size 768, moe_router_topk 8)",
                )
        if self.moe_router_topk > self.num_experts:
            raise ConfigError(
                f"{prefix}.moe_router_topk",
                f"{self.moe_router_topk} experts per token out of {self.num_experts}",
                "use at most num_experts",
            )
        if isinstance(self.moe_aux_loss_coeff, bool) or not self.moe_aux_loss_coeff >= 0:
            raise ConfigError(
                f"{prefix}.moe_aux_loss_coeff",
                f"must be a number >= 0, got {self.moe_aux_loss_coeff!r}",
                "use 0.001 (Qwen3-MoE's router_aux_loss_coef) or 0 to turn the load-balancing loss off",
            )
        if self.moe_z_loss_coeff is not None and not self.moe_z_loss_coeff > 0:
            raise ConfigError(
                f"{prefix}.moe_z_loss_coeff",
                f"must be > 0 or null, got {self.moe_z_loss_coeff!r}",
                "use a small weight such as 0.001, or null to turn the z-loss off",
            )


@dataclass
class ModelConfig:
    """A whole SAIL-VL model: vision encoder -> pixel shuffle + projector -> language model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    image_context_token_id: Optional[int] = None
    """Id of `<IMG_CONTEXT>`; set from the tokenizer at run time, never hard-coded."""

    @property
    def tokens_per_tile(self) -> int:
        """Language tokens one image tile becomes (256 for 448px tiles at ratio 0.5)."""
        return self.vision.num_patches // self.projector.merge_factor**2

    def validate(self) -> None:
        self.vision.validate()
        self.projector.validate(self.vision)
        self.language.validate()
        tid = self.image_context_token_id
        if tid is not None and not 0 <= tid < self.language.vocab_size:
            raise ConfigError(
                "model.image_context_token_id",
                f"{tid} is outside the vocabulary [0, {self.language.vocab_size})",
                "look the id up in the tokenizer",
            )


def _positive(cfg, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(
                f"{prefix}.{name}", f"must be a positive integer, got {value!r}", "set a positive integer"
            )
