"""The one name and layout mapping between Hugging Face (InternVL-chat / SAIL-VL) and our megatron-core model.

The conversion tool and the tests both use it. A `TensorRule` ties one parameter of the single-process
(TP1/PP1) model to the HF tensors it is made of and the layout change between them
(`sail_megatron.convert.layouts`). Expected HF names and shapes come from the ModelConfig alone, so a
checkpoint is checked completely (missing, extra, mis-shaped) before anything is written.

HF names (docs/design.md, Weight names), by family:
- InternViT: `vision_model.embeddings.*`, `vision_model.encoder.layers.N.*`;
- AIMv2 / SAILViT (SAIL-VL-1.5, 1.6, SAIL-VL2), apple/ml-aim names: `vision_model.preprocessor.*`,
  `vision_model.trunk.blocks.N.*`, `vision_model.trunk.post_trunk_norm`; transformers' own
  `Aimv2VisionModel` names (`embeddings.*`, `encoder.layers.N.*`, `rms_norm`) are translated by
  `AIMV2_TRANSFORMERS_NAMES` (standalone folders for `init`, and the reference forward);
- `mlp1.{0,1,3}`; Qwen2 / Qwen3 / Qwen3-MoE: `language_model.model.*`, `language_model.lm_head` (Qwen3-MoE's
  layers hold `mlp.gate` (the router) and `mlp.experts.E.{gate,up,down}_proj` instead of a dense MLP, as its
  releases store them and transformers 5 saves them; its in-memory fused expert tensors are never on disk).
Standalone vision and language folders (stage-1 `init`) use the same names without the `vision_model.` /
`language_model.` prefixes.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

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
    """copy | qkv (Qwen q,k,v) | stacked_qkv (InternViT / AIMv2 attn.qkv) | fc1 (gate, up) | vocab (padded rows) |
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


def _internvit_shapes(cfg: ModelConfig, prefix: str) -> Dict[str, Shape]:
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


def _aimv2_block(cfg: ModelConfig, prefix: str, i: int) -> Dict[str, Shape]:
    h, f = cfg.vision.hidden_size, cfg.vision.ffn_hidden_size
    p = f"{prefix}trunk.blocks.{i}."
    return {
        p + "norm_1.weight": (h,),
        p + "attn.qkv.weight": (3 * h, h),
        p + "attn.proj.weight": (h, h),
        p + "norm_2.weight": (h,),
        p + "mlp.fc1.weight": (f, h),
        p + "mlp.fc2.weight": (h, f),
        p + "mlp.fc3.weight": (f, h),
    }


def _aimv2_shapes(cfg: ModelConfig, prefix: str) -> Dict[str, Shape]:
    """Every tensor of the released AIMv2 / SAILViT (ml-aim names; all blocks and the final norm)."""
    v = cfg.vision
    h = v.hidden_size
    shapes = {
        f"{prefix}preprocessor.patchifier.proj.weight": (h, 3, v.patch_size, v.patch_size),
        f"{prefix}preprocessor.patchifier.proj.bias": (h,),
        f"{prefix}preprocessor.patchifier.norm.weight": (h,),
        f"{prefix}preprocessor.pos_embed": (1, v.num_patches, h),
    }
    for i in range(v.num_layers):
        shapes.update(_aimv2_block(cfg, prefix, i))
    shapes[f"{prefix}trunk.post_trunk_norm.weight"] = (h,)
    return shapes


def vision_shapes(cfg: ModelConfig, prefix: str = VISION_PREFIX) -> Dict[str, Shape]:
    """Every tensor of the released vision encoder (all layers, also those after select_layer)."""
    return _aimv2_shapes(cfg, prefix) if cfg.vision.arch == "aimv2" else _internvit_shapes(cfg, prefix)


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


def _mlp_shapes(cfg: ModelConfig, p: str) -> Dict[str, Shape]:
    """One decoder layer's MLP tensors: dense SwiGLU, or Qwen3-MoE's router and experts."""
    lang = cfg.language
    h = lang.hidden_size
    if not lang.is_moe:
        f = lang.ffn_hidden_size
        return {
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    f = lang.moe_ffn_hidden_size
    shapes = {p + "mlp.gate.weight": (lang.num_experts, h)}
    for e in range(lang.num_experts):
        x = f"{p}mlp.experts.{e}."
        shapes.update({x + "gate_proj.weight": (f, h), x + "up_proj.weight": (f, h), x + "down_proj.weight": (h, f)})
    return shapes


def language_shapes(cfg: ModelConfig, prefix: str = LLM_PREFIX, lm_head: bool = True) -> Dict[str, Shape]:
    """Qwen2ForCausalLM's / Qwen3ForCausalLM's / Qwen3MoeForCausalLM's tensors; `lm_head` says whether
    `lm_head.weight` is stored."""
    lang = cfg.language
    h, d = lang.hidden_size, lang.kv_channels
    q, kv = lang.num_attention_heads * d, lang.num_query_groups * d
    shapes = {f"{prefix}model.embed_tokens.weight": (lang.vocab_size, h)}
    for i in range(lang.num_layers):
        p = f"{prefix}model.layers.{i}."
        layer = {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            **_mlp_shapes(cfg, p),
        }
        if not lang.spec.qkv_bias:  # Qwen3, Qwen3-MoE
            layer = {n: s for n, s in layer.items() if not n.endswith("_proj.bias")}
        if lang.spec.qk_layernorm:
            layer.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        shapes.update(layer)
    shapes[f"{prefix}model.norm.weight"] = (h,)
    if lm_head:
        shapes[f"{prefix}lm_head.weight"] = (lang.vocab_size, h)
    return shapes


def expected_hf_shapes(cfg: ModelConfig, lm_head_stored: bool) -> Dict[str, Shape]:
    """Every tensor an InternVL-chat checkpoint of `cfg` holds."""
    lm_head = lm_head_stored or not cfg.language.tie_word_embeddings
    return {**vision_shapes(cfg), **projector_shapes(cfg), **language_shapes(cfg, lm_head=lm_head)}


def unused_hf_names(cfg: ModelConfig, prefix: str = VISION_PREFIX) -> List[str]:
    """ViT layers after `select_layer` (and AIMv2's final norm unless select_layer is -1): in the release,
    not in our model (carried beside the checkpoint)."""
    aimv2 = cfg.vision.arch == "aimv2"
    names: List[str] = []
    for i in range(cfg.vision.num_built_layers, cfg.vision.num_layers):
        names.extend(_aimv2_block(cfg, prefix, i) if aimv2 else _vision_layer(cfg, prefix, i))
    if aimv2 and not cfg.vision.applies_final_norm:
        names.append(f"{prefix}trunk.post_trunk_norm.weight")
    return names


def _aimv2_rules(cfg: ModelConfig, prefix: str) -> List[TensorRule]:
    rules = [
        TensorRule("vision_model.patch_embedding.weight", (f"{prefix}preprocessor.patchifier.proj.weight",)),
        TensorRule("vision_model.patch_embedding.bias", (f"{prefix}preprocessor.patchifier.proj.bias",)),
        TensorRule("vision_model.patch_norm.weight", (f"{prefix}preprocessor.patchifier.norm.weight",)),
        TensorRule("vision_model.position_embedding", (f"{prefix}preprocessor.pos_embed",)),
    ]
    for i in range(cfg.vision.num_built_layers):
        m, h = f"vision_model.decoder.layers.{i}.", f"{prefix}trunk.blocks.{i}."
        rules += [
            TensorRule(m + "input_layernorm.weight", (h + "norm_1.weight",)),
            TensorRule(m + "self_attention.linear_qkv.weight", (h + "attn.qkv.weight",), STACKED_QKV),
            TensorRule(m + "self_attention.linear_proj.weight", (h + "attn.proj.weight",)),
            TensorRule(m + "pre_mlp_layernorm.weight", (h + "norm_2.weight",)),
            # SwiGLU fc2(silu(fc1 x) * fc3 x): fc1 is the gate, fc3 the up projection.
            TensorRule(m + "mlp.linear_fc1.weight", (h + "mlp.fc1.weight", h + "mlp.fc3.weight"), FC1),
            TensorRule(m + "mlp.linear_fc2.weight", (h + "mlp.fc2.weight",)),
        ]
    if cfg.vision.applies_final_norm:
        rules.append(TensorRule("vision_model.final_layernorm.weight", (f"{prefix}trunk.post_trunk_norm.weight",)))
    return rules


def vision_rules(cfg: ModelConfig, prefix: str = VISION_PREFIX) -> List[TensorRule]:
    if cfg.vision.arch == "aimv2":
        return _aimv2_rules(cfg, prefix)
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


def _mlp_rules(cfg: ModelConfig, m: str, h: str) -> List[TensorRule]:
    """One layer's MLP. Dense: fc1 = [gate; up], fc2 = down. Qwen3-MoE: the router `mlp.gate` [experts,
    hidden] is megatron's `mlp.router.weight`; expert E is `mlp.experts.local_experts.E` of the single-process
    (EP 1) model, whose fc1/fc2 megatron checkpoints as the E-th slice of `mlp.experts.experts.linear_fc{1,2}`
    (so any EP, and TE's grouped experts, read the same tensors)."""
    if not cfg.language.is_moe:
        return [
            TensorRule(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), FC1),
            TensorRule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",)),
        ]
    rules = [TensorRule(m + "mlp.router.weight", (h + "mlp.gate.weight",))]
    for e in range(cfg.language.num_experts):
        me, he = f"{m}mlp.experts.local_experts.{e}.", f"{h}mlp.experts.{e}."
        rules += [
            TensorRule(me + "linear_fc1.weight", (he + "gate_proj.weight", he + "up_proj.weight"), FC1),
            TensorRule(me + "linear_fc2.weight", (he + "down_proj.weight",)),
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
        ]
        if cfg.language.spec.qkv_bias:
            rules.append(
                TensorRule(
                    m + "self_attention.linear_qkv.bias",
                    (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                    QKV,
                )
            )
        if cfg.language.spec.qk_layernorm:  # Qwen3: RMSNorm over each head of q and k
            rules += [
                TensorRule(m + "self_attention.q_layernorm.weight", (a + "q_norm.weight",)),
                TensorRule(m + "self_attention.k_layernorm.weight", (a + "k_norm.weight",)),
            ]
        rules += [
            TensorRule(m + "self_attention.linear_proj.weight", (a + "o_proj.weight",)),
            TensorRule(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)),
            *_mlp_rules(cfg, m, h),
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


# AIMv2 under transformers' `Aimv2VisionModel` names (transformers' own AIMv2 converter, and the HF-native
# apple/aimv2-*-patch14-448 releases): ml-aim name (without prefix) -> transformers name. Per block the
# fused `attn.qkv` rows [q; k; v] are `attention.{q,k,v}_proj`; `pos_embed` [1, N, H] is the nn.Embedding
# table [N, H]. transformers' attention-pooling `head.*` has no ml-aim counterpart (SAIL-VL reads hidden
# states, never the pooled output).
AIMV2_TRANSFORMERS_NAMES = {
    "preprocessor.patchifier.proj.weight": "embeddings.patch_embed.weight",
    "preprocessor.patchifier.proj.bias": "embeddings.patch_embed.bias",
    "preprocessor.patchifier.norm.weight": "embeddings.rms_norm.weight",
    "preprocessor.pos_embed": "embeddings.position_embedding.weight",
    "trunk.post_trunk_norm.weight": "rms_norm.weight",
}
AIMV2_TRANSFORMERS_BLOCK_NAMES = {
    "norm_1.weight": "rms_norm1.weight",
    "norm_2.weight": "rms_norm2.weight",
    "attn.proj.weight": "attention.out_proj.weight",
    "mlp.fc1.weight": "ffn.gate_proj.weight",
    "mlp.fc2.weight": "ffn.down_proj.weight",
    "mlp.fc3.weight": "ffn.up_proj.weight",
}
AIMV2_TRANSFORMERS_HEAD_PREFIX = "head."


def aimv2_transformers_names(name: str) -> Tuple[str, ...]:
    """The transformers `Aimv2VisionModel` tensors one ml-aim tensor (name without prefix) is made of."""
    if name in AIMV2_TRANSFORMERS_NAMES:
        return (AIMV2_TRANSFORMERS_NAMES[name],)
    parts = name.split(".", 3)  # trunk.blocks.N.rest
    if len(parts) == 4 and parts[:2] == ["trunk", "blocks"]:
        layer, rest = f"encoder.layers.{parts[2]}.", parts[3]
        if rest == "attn.qkv.weight":
            return tuple(f"{layer}attention.{p}_proj.weight" for p in "qkv")
        if rest in AIMV2_TRANSFORMERS_BLOCK_NAMES:
            return (layer + AIMV2_TRANSFORMERS_BLOCK_NAMES[rest],)
    raise KeyError(f"{name} is not an AIMv2 (ml-aim) tensor name")


def aimv2_to_transformers(name: str, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One ml-aim tensor -> its transformers `Aimv2VisionModel` tensors (exact: views and splits)."""
    names = aimv2_transformers_names(name)
    if name == "preprocessor.pos_embed":
        return {names[0]: tensor.reshape(tensor.shape[-2:])}
    return dict(zip(names, torch.chunk(tensor, len(names), dim=0)))


def aimv2_from_transformers(name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of `aimv2_to_transformers`: the ml-aim tensor `name` from its transformers tensors."""
    if name == "preprocessor.pos_embed":
        return tensors[0].reshape(1, *tensors[0].shape)
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=0)


def aimv2_from_transformers_shape(name: str, shapes: Sequence[Shape]) -> Optional[Shape]:
    """The shape `aimv2_from_transformers` gives (None where the pieces do not stack)."""
    if name == "preprocessor.pos_embed":
        return (1, *shapes[0])
    if len(shapes) == 1:
        return tuple(shapes[0])
    if any(len(s) != len(shapes[0]) or tuple(s[1:]) != tuple(shapes[0][1:]) for s in shapes):
        return None
    return (sum(s[0] for s in shapes), *shapes[0][1:])


# InternViT (InternVL-chat, names without `vision_model.`) -> transformers `InternVLVisionModel` names; the
# fused `attn.qkv` becomes its thirds `attention.{q,k,v}_proj` (rows [q; k; v]).
INTERNVIT_TRANSFORMERS_EMBEDDINGS = {
    "embeddings.class_embedding": "embeddings.cls_token",
    "embeddings.position_embedding": "embeddings.position_embeddings",
    "embeddings.patch_embedding.weight": "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embedding.bias": "embeddings.patch_embeddings.projection.bias",
}
INTERNVIT_TRANSFORMERS_LAYER = {
    "ls1": "lambda_1",
    "ls2": "lambda_2",
    **{f"attn.proj.{wb}": f"attention.projection_layer.{wb}" for wb in ("weight", "bias")},
    **{f"norm1.{wb}": f"layernorm_before.{wb}" for wb in ("weight", "bias")},
    **{f"norm2.{wb}": f"layernorm_after.{wb}" for wb in ("weight", "bias")},
    **{f"mlp.{fc}.{wb}": f"mlp.{fc}.{wb}" for fc in ("fc1", "fc2") for wb in ("weight", "bias")},
}


def internvit_transformers_names(name: str) -> Tuple[str, ...]:
    """The transformers `InternVLVisionModel` tensors one InternViT tensor (name without prefix) is made of."""
    if name in INTERNVIT_TRANSFORMERS_EMBEDDINGS:
        return (INTERNVIT_TRANSFORMERS_EMBEDDINGS[name],)
    parts = name.split(".", 3)  # encoder.layers.N.rest
    if len(parts) == 4 and parts[:2] == ["encoder", "layers"]:
        layer, tail = f"encoder.layer.{parts[2]}.", parts[3]
        if tail in ("attn.qkv.weight", "attn.qkv.bias"):
            wb = tail.rsplit(".", 1)[1]
            return tuple(f"{layer}attention.{p}_proj.{wb}" for p in "qkv")
        if tail in INTERNVIT_TRANSFORMERS_LAYER:
            return (layer + INTERNVIT_TRANSFORMERS_LAYER[tail],)
    raise KeyError(f"{name} is not an InternViT tensor name")


def internvit_to_transformers(name: str, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One InternViT tensor -> its transformers `InternVLVisionModel` tensors (renames and row splits)."""
    names = internvit_transformers_names(name)
    return dict(zip(names, torch.chunk(tensor, len(names), dim=0)))
