"""Parameter counts from a config alone (no weights allocated), by model part."""

from dataclasses import dataclass

from sail_megatron.config import LanguageConfig, ModelConfig, VisionConfig


@dataclass(frozen=True)
class ParameterCount:
    vision_built: int
    """Encoder parameters actually built (layers up to select_layer)."""
    vision_checkpoint: int
    """Encoder parameters of the released checkpoint (all layers)."""
    projector: int
    language: int
    """Unpadded vocabulary, as in the Hugging Face checkpoint."""
    language_active: int = 0
    """Language parameters one token uses: `language` for a dense model, the router and top-k experts of
    each layer (not all experts) for a mixture of experts."""

    @property
    def total_built(self) -> int:
        return self.vision_built + self.projector + self.language

    @property
    def total_checkpoint(self) -> int:
        return self.vision_checkpoint + self.projector + self.language


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _norm(v: VisionConfig) -> int:
    """One norm of the encoder: LayerNorm has a weight and a bias, RMSNorm a weight."""
    return v.hidden_size * (2 if v.spec.normalization == "LayerNorm" else 1)


def vision_layer_parameters(v: VisionConfig) -> int:
    h, f, arch = v.hidden_size, v.ffn_hidden_size, v.spec
    attention = _linear(h, 3 * h, arch.bias) + _linear(h, h, arch.bias)
    if arch.gated_mlp:
        mlp = 2 * _linear(h, f, arch.bias) + _linear(f, h, arch.bias)  # gate, up, down
    else:
        mlp = _linear(h, f, arch.bias) + _linear(f, h, arch.bias)
    scales = 2 * h if arch.layer_scale else 0  # ls1, ls2
    return attention + mlp + 2 * _norm(v) + scales


def vision_embedding_parameters(v: VisionConfig) -> int:
    """Patch conv (with bias), its norm, the CLS token and the learned positions."""
    patch = _linear(3 * v.patch_size**2, v.hidden_size, True)
    cls = v.hidden_size if v.spec.cls_token else 0
    patch_norm = _norm(v) if v.spec.patch_norm else 0
    return patch + patch_norm + cls + v.num_positions * v.hidden_size


def vision_final_norm_parameters(v: VisionConfig, built: bool) -> int:
    """The encoder's final norm: in every checkpoint of a family that has one; built only when used."""
    stored = _norm(v) if v.spec.final_norm else 0
    return stored if not built or v.applies_final_norm else 0


def language_mlp_parameters(lang: LanguageConfig, active: bool = False) -> int:
    """One decoder layer's MLP: the dense SwiGLU (gate, up, down; no biases), or a mixture of experts: the
    router [experts, hidden] and every expert's SwiGLU (`active`: only the top-k experts a token runs)."""
    h = lang.hidden_size
    if not lang.is_moe:
        return 3 * h * lang.ffn_hidden_size
    experts = lang.moe_router_topk if active else lang.num_experts
    return lang.num_experts * h + experts * 3 * h * lang.moe_ffn_hidden_size


def language_parameters(lang: LanguageConfig, active: bool = False) -> int:
    """The decoder's parameters (unpadded vocabulary); `active`: those one token uses (for a mixture of
    experts the router and the top-k experts of each layer; the same as all for a dense model)."""
    h, d = lang.hidden_size, lang.kv_channels
    q, kv = lang.num_attention_heads * d, lang.num_query_groups * d
    bias = lang.spec.qkv_bias
    attention = _linear(h, q, bias) + 2 * _linear(h, kv, bias) + _linear(q, h, False)
    qk_norms = 2 * d if lang.spec.qk_layernorm else 0
    layer = attention + qk_norms + language_mlp_parameters(lang, active) + 2 * h  # two RMSNorms
    embeddings = lang.vocab_size * h * (1 if lang.tie_word_embeddings else 2)
    return lang.num_layers * layer + h + embeddings


def projector_parameters(model: ModelConfig) -> int:
    width = model.vision.hidden_size * model.projector.merge_factor**2
    h = model.language.hidden_size
    return 2 * width + _linear(width, h, True) + _linear(h, h, True)


def count_parameters(model: ModelConfig) -> ParameterCount:
    v = model.vision
    embed = vision_embedding_parameters(v)
    layer = vision_layer_parameters(v)
    return ParameterCount(
        vision_built=embed + v.num_built_layers * layer + vision_final_norm_parameters(v, built=True),
        vision_checkpoint=embed + v.num_layers * layer + vision_final_norm_parameters(v, built=False),
        projector=projector_parameters(model),
        language=language_parameters(model.language),
        language_active=language_parameters(model.language, active=True),
    )
