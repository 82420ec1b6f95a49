"""transformers' own InternVL layout (`InternVLForConditionalGeneration`, model_type `internvl`): which of our
models it represents, its tensor names, and its config, generation, processor and tokenizer settings.

The folder loads with `AutoModelForImageTextToText` / `AutoProcessor`, no remote code. What transformers'
InternVL computes, and so what it can represent (transformers 5.x, models/internvl/modeling_internvl.py):
- vision tower `InternVLVisionModel`: InternViT only (LayerNorm, qkv bias, layer scale, CLS token). With
  `use_mean_pooling` true its final `layernorm` is an identity, so `vision_feature_layer` -1 is the last
  layer's output as InternViT gives it; another value indexes `hidden_states` ([embeddings, layer 1, ...]),
  InternVL's `select_layer` counting, both signs;
- pixel shuffle: always InternVL's v2 (the final permute); sizes computed in floating point from
  `downsample_ratio`;
- projector `InternVLMultiModalProjector`: LayerNorm with PyTorch's default eps 1e-5 (not configurable),
  Linear, `projector_hidden_act` ('gelu': the exact erf form), Linear, all with bias (InternVL's `mlp1`);
- language model: any `text_config` AutoModel builds (Qwen2 / Qwen2.5, Qwen3 and Qwen3-MoE here: its experts
  stored per expert, `mlp.experts.E.{gate,up,down}_proj`, which transformers 5 fuses on load); with tied
  embeddings transformers ties `lm_head` to them (top-level `tie_word_embeddings`).
AIMv2 / SAILViT encoders (SAIL-VL-1.5/1.6, SAIL-VL2), `ps_version` v1 and another projector LayerNorm eps are
refused (`unsupported`).

Tensor names, from InternVL-chat names (`mapping.py`; the same renaming as transformers' own InternVL
converter): `vision_model.` -> `model.vision_tower.` with `encoder.layers.N` -> `encoder.layer.N`,
`class_embedding` -> `cls_token`, `position_embedding` -> `position_embeddings`, `patch_embedding` ->
`patch_embeddings.projection`, `attn.qkv` -> the thirds `attention.{q,k,v}_proj` (rows [q; k; v]), `attn.proj`
-> `attention.projection_layer`, `norm1/norm2` -> `layernorm_before/layernorm_after`, `ls1/ls2` ->
`lambda_1/lambda_2`; `mlp1.{0,1,3}` -> `model.multi_modal_projector.{layer_norm,linear_1,linear_2}`;
`language_model.model.` -> `model.language_model.`; `language_model.lm_head` -> `lm_head`.

Processor: transformers' `InternVLProcessor` always loads a video processor, which needs torchvision; the
export names `QianfanOCRProcessor` instead, transformers' InternVL-style processor for images only: it replaces
each `<image>` in the text with `<img>` + `<IMG_CONTEXT>` x tiles x `image_seq_length` + `</img>` and tiles
images with `GotOcr2ImageProcessor` (InternVL's dynamic tiling, a thumbnail after several tiles; the PIL
backend when torchvision is missing). The tokenizer names the three image tokens (`start_image_token`,
`end_image_token`, `context_image_token`) for it.
"""

from typing import Dict, List, Optional, Tuple

import torch

from sail_megatron.config import ModelConfig
from sail_megatron.convert import mapping
from sail_megatron.convert.errors import raise_if
from sail_megatron.convert.hf_config import DTYPE_NAMES, put_language
from sail_megatron.data.tokenizer import IMG_CONTEXT, IMG_END, IMG_START

MODEL_TYPE = "internvl"
ARCHITECTURE = "InternVLForConditionalGeneration"
VISION_MODEL_TYPE = "internvl_vision"
PROCESSOR_CLASS = "QianfanOCRProcessor"
IMAGE_PROCESSOR_CLASS = "GotOcr2ImageProcessor"
PROJECTOR_LAYERNORM_EPS = 1e-5
"""`InternVLMultiModalProjector.layer_norm` is a plain nn.LayerNorm."""
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as InternVL's and our tiling resize
IMAGE_TOKEN_NAMES = {"start_image_token": IMG_START, "end_image_token": IMG_END, "context_image_token": IMG_CONTEXT}
"""The tokenizer attributes transformers' InternVL-style processors read the image tokens from."""

VISION_TOWER = "model.vision_tower."
PROJECTOR = "model.multi_modal_projector."
LANGUAGE = "model.language_model."
LM_HEAD = "lm_head.weight"

_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}


def _shuffle_is_exact(cfg: ModelConfig) -> bool:
    """transformers' pixel shuffle and projector width give our sizes (its arithmetic is in floats)."""
    r, k = cfg.projector.downsample_ratio, cfg.projector.merge_factor
    grid, width = cfg.vision.image_size // cfg.vision.patch_size, cfg.vision.hidden_size
    return (
        int(1 / r) == k
        and grid % r == 0
        and int(grid * r) * k == grid
        and int(width / r) == width * k
        and int(width / (r * r)) == width * k * k
    )


def unsupported(cfg: ModelConfig) -> List[str]:
    """Every setting of `cfg` transformers' InternVL cannot represent, one line each (field, reason)."""
    problems = []
    if cfg.vision.arch != "internvit":
        problems.append(
            f"model.vision.arch is {cfg.vision.arch!r}: transformers' InternVL has an InternViT vision tower "
            "(InternVLVisionModel) only; AIMv2 / SAILViT models (SAIL-VL-1.5, 1.6, SAIL-VL2) have no "
            "transformers-native InternVL layout"
        )
    if cfg.projector.ps_version != "v2":
        problems.append(
            f"model.projector.ps_version is {cfg.projector.ps_version!r}: transformers' InternVL implements the "
            "v2 pixel shuffle only (v1 leaves the token grid transposed)"
        )
    if cfg.projector.layernorm_epsilon != PROJECTOR_LAYERNORM_EPS:
        problems.append(
            f"model.projector.layernorm_epsilon is {cfg.projector.layernorm_epsilon}: transformers' InternVL "
            f"projector LayerNorm uses {PROJECTOR_LAYERNORM_EPS} and cannot be configured"
        )
    if not _shuffle_is_exact(cfg):
        problems.append(
            f"model.projector.downsample_ratio is {cfg.projector.downsample_ratio}: transformers' InternVL "
            "computes the shuffled sizes in floating point, which is exact for ratios such as 0.5 or 0.25 "
            "but not for this one with this image, patch and hidden size"
        )
    return problems


def check_supported(cfg: ModelConfig) -> None:
    """Raise a ConversionError naming every setting the transformers layout cannot represent."""
    raise_if(
        unsupported(cfg),
        "cannot export this model as transformers' InternVLForConditionalGeneration (--format transformers)",
        "export it with --format internvl-chat (the default: the SAIL-VL / InternVL-chat layout, loaded with "
        "trust_remote_code)",
    )


def transformers_names(name: str) -> Tuple[str, ...]:
    """The `InternVLForConditionalGeneration` tensors one InternVL-chat tensor becomes (InternViT + Qwen)."""
    if name.startswith(mapping.VISION_PREFIX):
        return tuple(VISION_TOWER + n for n in mapping.internvit_transformers_names(name[len(mapping.VISION_PREFIX) :]))
    elif name.startswith(mapping.PROJECTOR_PREFIX):
        index, _, wb = name[len(mapping.PROJECTOR_PREFIX) :].partition(".")
        if index in _PROJECTOR and wb in ("weight", "bias"):
            return (f"{PROJECTOR}{_PROJECTOR[index]}.{wb}",)
    elif name.startswith(f"{mapping.LLM_PREFIX}model."):
        return (LANGUAGE + name[len(f"{mapping.LLM_PREFIX}model.") :],)
    elif name == f"{mapping.LLM_PREFIX}lm_head.weight":
        return (LM_HEAD,)
    raise KeyError(f"{name} has no InternVLForConditionalGeneration name")


def to_transformers(name: str, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One InternVL-chat tensor -> its `InternVLForConditionalGeneration` tensors (renames and row splits)."""
    names = transformers_names(name)
    return dict(zip(names, torch.chunk(tensor, len(names), dim=0)))


def transformers_shapes(cfg: ModelConfig) -> Dict[str, mapping.Shape]:
    """Every tensor the folder of `cfg` holds; `lm_head` only when untied (transformers ties it)."""
    shapes: Dict[str, mapping.Shape] = {}
    for name, shape in mapping.expected_hf_shapes(cfg, lm_head_stored=False).items():
        names = transformers_names(name)
        shapes.update({n: (shape[0] // len(names), *shape[1:]) for n in names})
    return shapes


def transformers_config(cfg: ModelConfig, dtype: str, image_token_id: int) -> Dict:
    """config.json of `InternVLForConditionalGeneration` for `cfg` (every field our model depends on explicit)."""
    v, lang = cfg.vision, cfg.language
    text: Dict = {}
    put_language(text, lang)  # Qwen2 / Qwen3 / Qwen3-MoE fields, architectures and model_type
    text.update(
        rms_norm_eps=lang.norm_epsilon,
        tie_word_embeddings=lang.tie_word_embeddings,
        max_position_embeddings=lang.max_position_embeddings,
        hidden_act="silu",
        use_sliding_window=False,
        dtype=DTYPE_NAMES[dtype],
    )
    vision = {
        "model_type": VISION_MODEL_TYPE,
        "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_attention_heads,
        "intermediate_size": v.ffn_hidden_size,
        "image_size": [v.image_size, v.image_size],
        "patch_size": [v.patch_size, v.patch_size],
        "num_channels": 3,
        "hidden_act": "gelu",
        "layer_norm_eps": v.layernorm_epsilon,
        "norm_type": "layer_norm",
        "attention_bias": True,
        "use_qk_norm": False,
        "layer_scale_init_value": v.layer_scale_init,
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
        "use_mean_pooling": True,  # makes the final `layernorm` an identity: InternViT has none
        "hidden_dropout_prob": 0.0,
        "attention_dropout": 0.0,
        "projection_dropout": 0.0,
        "dtype": DTYPE_NAMES[dtype],
    }
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vision_config": vision,
        "text_config": text,
        "image_token_id": image_token_id,
        "image_seq_length": cfg.tokens_per_tile,
        "downsample_ratio": cfg.projector.downsample_ratio,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": v.select_layer,
        "vision_feature_select_strategy": "default",  # drops the CLS token
        "tie_word_embeddings": lang.tie_word_embeddings,
        "dtype": DTYPE_NAMES[dtype],
    }


def generation_config(eos_token_ids: List[int], pad_token_id: Optional[int]) -> Dict:
    """generation_config.json: a chat model stops at `<|im_end|>` (and `<|endoftext|>`)."""
    config: Dict = {"eos_token_id": eos_token_ids}
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    return config


def image_processor_config(cfg: ModelConfig, min_tiles: int, max_tiles: int) -> Dict:
    """preprocessor_config.json: InternVL's tiling into `image_size` tiles (min..max tiles plus a thumbnail
    when there are several), bicubic resize, ImageNet normalization, as the trainer's tile decoder."""
    from sail_megatron.data.decode_pil import IMAGENET_MEAN, IMAGENET_STD  # imported here: it imports triton

    size = cfg.vision.image_size
    return {
        "image_processor_type": IMAGE_PROCESSOR_CLASS,
        "processor_class": PROCESSOR_CLASS,
        "crop_to_patches": True,
        "min_patches": min_tiles,
        "max_patches": max_tiles,
        "size": {"height": size, "width": size},
        "resample": BICUBIC,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    }


def processor_config(cfg: ModelConfig) -> Dict:
    """processor_config.json: the processor class and the `<IMG_CONTEXT>` count of one tile."""
    from sail_megatron.data.sample import IMAGE_PLACEHOLDER  # imported here: it imports megatron-energon

    return {
        "processor_class": PROCESSOR_CLASS,
        "image_seq_length": cfg.tokens_per_tile,
        "image_placeholder_token": IMAGE_PLACEHOLDER,
    }


def tokenizer_config(source: Dict, chat_template: str) -> Dict:
    """The exported tokenizer_config.json: the source's, with the chat template and the image-token names the
    processor reads (a `extra_special_tokens` dict as transformers' InternVL tokenizers have; top-level
    `*_token` keys, which transformers 5 reads alike, when the source keeps a list there)."""
    out = dict(source)
    out["chat_template"] = chat_template
    extra = out.get("extra_special_tokens")
    if extra is None or isinstance(extra, dict):
        out["extra_special_tokens"] = {**(extra or {}), **IMAGE_TOKEN_NAMES}
    else:
        out.update(IMAGE_TOKEN_NAMES)
    if "processor_class" in out:
        out["processor_class"] = PROCESSOR_CLASS
    return out
