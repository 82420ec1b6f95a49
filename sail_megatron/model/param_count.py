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

    @property
    def total_built(self) -> int:
        return self.vision_built + self.projector + self.language

    @property
    def total_checkpoint(self) -> int:
        return self.vision_checkpoint + self.projector + self.language


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def vision_layer_parameters(v: VisionConfig) -> int:
    h, f = v.hidden_size, v.ffn_hidden_size
    attention = _linear(h, 3 * h, True) + _linear(h, h, True)
    mlp = _linear(h, f, True) + _linear(f, h, True)
    norms_and_scales = 2 * 2 * h + 2 * h  # two LayerNorms (weight, bias), ls1, ls2
    return attention + mlp + norms_and_scales


def vision_embedding_parameters(v: VisionConfig) -> int:
    patch = _linear(3 * v.patch_size**2, v.hidden_size, True)
    return patch + v.hidden_size + (v.num_patches + 1) * v.hidden_size  # + CLS + positions


def language_parameters(lang: LanguageConfig) -> int:
    h, d = lang.hidden_size, lang.kv_channels
    kv = lang.num_query_groups * d
    attention = _linear(h, h, True) + 2 * _linear(h, kv, True) + _linear(h, h, False)
    mlp = 3 * h * lang.ffn_hidden_size  # gate, up, down; no biases
    layer = attention + mlp + 2 * h  # two RMSNorms
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
        vision_built=embed + v.num_built_layers * layer,
        vision_checkpoint=embed + v.num_layers * layer,
        projector=projector_parameters(model),
        language=language_parameters(model.language),
    )
