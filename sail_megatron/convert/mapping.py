"""The one name and layout mapping between Hugging Face (InternVL-chat) and our megatron-core model.

The conversion tool and the tests both use it. A `TensorRule` ties one parameter of the single-process
(TP1/PP1) model to the HF tensors it is made of and the layout change between them
(`sail_megatron.convert.layouts`). Expected HF names and shapes come from the ModelConfig alone, so a
checkpoint is checked completely (missing, extra, mis-shaped) before anything is written.

HF names (docs/design.md, Weight names): `vision_model.embeddings.*`, `vision_model.encoder.layers.N.*`,
`mlp1.{0,1,3}`, `language_model.model.*`, `language_model.lm_head`. Standalone InternViT and Qwen2 folders
(stage-1 `init`) use the same names without the `vision_model.` / `language_model.` prefixes.
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from sail_megatron.config import ModelConfig
from sail_megatron.convert import layouts

VISION_PREFIX = "vision_model."
LLM_PREFIX = "language_model."
PROJECTOR_PREFIX = "mlp1."

COPY, QKV, STACKED_QKV, FC1, VOCAB, TIED_HEAD = "copy", "qkv", "stacked_qkv", "fc1", "vocab", "tied_head"


@dataclass(frozen=True)
class TensorRule:
    """One megatron parameter <- HF tensors `hf` (in the order the layout function takes them)."""

    mcore: str
    hf: Tuple[str, ...]
    kind: str = COPY
    """copy | qkv (Qwen2 q,k,v) | stacked_qkv (InternViT attn.qkv) | fc1 (gate, up) | vocab (padded rows) |
    tied_head (an lm_head stored beside tied embeddings: checked equal on import, re-created on export)."""


Shape = Tuple[int, ...]


def _vision_layer(cfg: ModelConfig, prefix: str, i: int) -> Dict[str, Shape]:
    h, f = cfg.vision.hidden_size, cfg.vision.ffn_hidden_size
    p = f"{prefix}encoder.layers.{i}."
    return {
        p + "attn.qkv.weight": (3 * h, h),
        p + "attn.qkv.bias": (3 * h,),
        p + "attn.proj.weight": (h, h),
        p + "attn.proj.bias": (h,),
        p + "mlp.fc1.weight": (f, h),
        p + "mlp.fc1.bias": (f,),
        p + "mlp.fc2.weight": (h, f),
        p + "mlp.fc2.bias": (h,),
        p + "norm1.weight": (h,),
        p + "norm1.bias": (h,),
        p + "norm2.weight": (h,),
        p + "norm2.bias": (h,),
        p + "ls1": (h,),
        p + "ls2": (h,),
    }


def vision_shapes(cfg: ModelConfig, prefix: str = VISION_PREFIX) -> Dict[str, Shape]:
    """Every tensor of the released InternViT (all layers, also those after select_layer)."""
    v = cfg.vision
    h = v.hidden_size
    shapes = {
        f"{prefix}embeddings.class_embedding": (1, 1, h),
        f"{prefix}embeddings.patch_embedding.weight": (h, 3, v.patch_size, v.patch_size),
        f"{prefix}embeddings.patch_embedding.bias": (h,),
        f"{prefix}embeddings.position_embedding": (1, v.num_patches + 1, h),
    }
    for i in range(v.num_layers):
        shapes.update(_vision_layer(cfg, prefix, i))
    return shapes


def projector_shapes(cfg: ModelConfig, prefix: str = PROJECTOR_PREFIX) -> Dict[str, Shape]:
    width = cfg.vision.hidden_size * cfg.projector.merge_factor**2
    h = cfg.language.hidden_size
    return {
        f"{prefix}0.weight": (width,),
        f"{prefix}0.bias": (width,),
        f"{prefix}1.weight": (h, width),
        f"{prefix}1.bias": (h,),
        f"{prefix}3.weight": (h, h),
        f"{prefix}3.bias": (h,),
    }


def language_shapes(cfg: ModelConfig, prefix: str = LLM_PREFIX, lm_head: bool = True) -> Dict[str, Shape]:
    """Qwen2ForCausalLM's tensors; `lm_head` says whether `lm_head.weight` is stored."""
    lang = cfg.language
    h, f, d = lang.hidden_size, lang.ffn_hidden_size, lang.kv_channels
    q, kv = lang.num_attention_heads * d, lang.num_query_groups * d
    shapes = {f"{prefix}model.embed_tokens.weight": (lang.vocab_size, h)}
    for i in range(lang.num_layers):
        p = f"{prefix}model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    shapes[f"{prefix}model.norm.weight"] = (h,)
    if lm_head:
        shapes[f"{prefix}lm_head.weight"] = (lang.vocab_size, h)
    return shapes


def expected_hf_shapes(cfg: ModelConfig, lm_head_stored: bool) -> Dict[str, Shape]:
    """Every tensor an InternVL-chat checkpoint of `cfg` holds."""
    lm_head = lm_head_stored or not cfg.language.tie_word_embeddings
    return {**vision_shapes(cfg), **projector_shapes(cfg), **language_shapes(cfg, lm_head=lm_head)}


def unused_hf_names(cfg: ModelConfig, prefix: str = VISION_PREFIX) -> List[str]:
    """ViT layers after `select_layer`: in the release, not in our model (carried beside the checkpoint)."""
    names: List[str] = []
    for i in range(cfg.vision.num_built_layers, cfg.vision.num_layers):
        names.extend(_vision_layer(cfg, prefix, i))
    return names


def vision_rules(cfg: ModelConfig, prefix: str = VISION_PREFIX) -> List[TensorRule]:
    rules = [
        TensorRule("vision_model.class_embedding", (f"{prefix}embeddings.class_embedding",)),
        TensorRule("vision_model.position_embedding", (f"{prefix}embeddings.position_embedding",)),
        TensorRule("vision_model.patch_embedding.weight", (f"{prefix}embeddings.patch_embedding.weight",)),
        TensorRule("vision_model.patch_embedding.bias", (f"{prefix}embeddings.patch_embedding.bias",)),
    ]
    for i in range(cfg.vision.num_built_layers):
        m, h = f"vision_model.decoder.layers.{i}.", f"{prefix}encoder.layers.{i}."
        rules += [TensorRule(m + "ls1", (h + "ls1",)), TensorRule(m + "ls2", (h + "ls2",))]
        for wb in ("weight", "bias"):
            rules += [
                TensorRule(m + f"input_layernorm.{wb}", (h + f"norm1.{wb}",)),
                TensorRule(m + f"pre_mlp_layernorm.{wb}", (h + f"norm2.{wb}",)),
                TensorRule(m + f"self_attention.linear_qkv.{wb}", (h + f"attn.qkv.{wb}",), STACKED_QKV),
                TensorRule(m + f"self_attention.linear_proj.{wb}", (h + f"attn.proj.{wb}",)),
                TensorRule(m + f"mlp.linear_fc1.{wb}", (h + f"mlp.fc1.{wb}",)),
                TensorRule(m + f"mlp.linear_fc2.{wb}", (h + f"mlp.fc2.{wb}",)),
            ]
    return rules


def projector_rules(prefix: str = PROJECTOR_PREFIX) -> List[TensorRule]:
    rules = []
    for wb in ("weight", "bias"):
        rules += [
            TensorRule(f"projector.layer_norm.{wb}", (f"{prefix}0.{wb}",)),
            TensorRule(f"projector.mlp.encoder.linear_fc1.{wb}", (f"{prefix}1.{wb}",)),
            TensorRule(f"projector.mlp.encoder.linear_fc2.{wb}", (f"{prefix}3.{wb}",)),
        ]
    return rules


def language_rules(cfg: ModelConfig, prefix: str = LLM_PREFIX, lm_head_stored: bool = False) -> List[TensorRule]:
    rules = [
        TensorRule("language_model.embedding.word_embeddings.weight", (f"{prefix}model.embed_tokens.weight",), VOCAB)
    ]
    for i in range(cfg.language.num_layers):
        m, h = f"language_model.decoder.layers.{i}.", f"{prefix}model.layers.{i}."
        a = h + "self_attn."
        rules += [
            TensorRule(m + "input_layernorm.weight", (h + "input_layernorm.weight",)),
            TensorRule(
                m + "self_attention.linear_qkv.weight",
                (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                QKV,
            ),
            TensorRule(
                m + "self_attention.linear_qkv.bias", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), QKV
            ),
            TensorRule(m + "self_attention.linear_proj.weight", (a + "o_proj.weight",)),
            TensorRule(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)),
            TensorRule(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), FC1),
            TensorRule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",)),
        ]
    rules.append(TensorRule("language_model.decoder.final_layernorm.weight", (f"{prefix}model.norm.weight",)))
    if not cfg.language.tie_word_embeddings:
        rules.append(TensorRule("language_model.output_layer.weight", (f"{prefix}lm_head.weight",), VOCAB))
    elif lm_head_stored:
        rules.append(
            TensorRule("language_model.embedding.word_embeddings.weight", (f"{prefix}lm_head.weight",), TIED_HEAD)
        )
    return rules


def tensor_rules(cfg: ModelConfig, lm_head_stored: bool = False) -> List[TensorRule]:
    """Rules for every parameter of the single-process model (plus a stored tied lm_head)."""
    return vision_rules(cfg) + projector_rules() + language_rules(cfg, lm_head_stored=lm_head_stored)


def to_mcore(rule: TensorRule, tensors: Sequence[torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> torch.Tensor:
    """HF tensors of `rule` -> the megatron parameter's full (TP1) value."""
    if rule.kind == COPY:
        return tensors[0]
    if rule.kind == QKV:
        return layouts.qkv_to_mcore(*tensors, cfg.language.num_attention_heads, cfg.language.num_query_groups)
    if rule.kind == STACKED_QKV:
        return layouts.stacked_qkv_to_mcore(tensors[0], cfg.vision.num_attention_heads)
    if rule.kind == FC1:
        return layouts.fc1_to_mcore(*tensors)
    if rule.kind == VOCAB:
        return layouts.pad_vocab(tensors[0], padded_vocab)
    raise ValueError(f"rule kind {rule.kind!r} has no megatron parameter of its own")


def to_hf(rule: TensorRule, value: torch.Tensor, cfg: ModelConfig) -> Tuple[torch.Tensor, ...]:
    """A megatron parameter's full (TP1) value -> the HF tensors of `rule`, in `rule.hf` order."""
    if rule.kind == COPY:
        return (value,)
    if rule.kind == QKV:
        return layouts.qkv_from_mcore(value, cfg.language.num_attention_heads, cfg.language.num_query_groups)
    if rule.kind == STACKED_QKV:
        return (layouts.stacked_qkv_from_mcore(value, cfg.vision.num_attention_heads),)
    if rule.kind == FC1:
        return layouts.fc1_from_mcore(value)
    if rule.kind in (VOCAB, TIED_HEAD):
        return (layouts.strip_vocab(value, cfg.language.vocab_size),)
    raise ValueError(f"unknown rule kind {rule.kind!r}")
