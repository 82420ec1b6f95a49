"""InternVL-chat / SAIL-VL `config.json` (the SAIL-VL release format) <-> our ModelConfig.

Families: `model_type` `internvl_chat` (InternVL, SAIL-VL, SAIL-VL-1.5/1.6) or `sailvl` (SAIL-VL2);
`vision_config` InternViT-300M style or AIMv2 / SAILViT (`model_type` `aimv2`, `sailvit`, or transformers'
`aimv2_vision_model`); `llm_config` Qwen2 / Qwen2.5, dense Qwen3 or Qwen3-MoE (SAIL-VL2's MoE model).

Reading checks every field our model depends on and collects *all* problems (unknown model type,
unsupported features such as qk-normalization, biased AIMv2 layers, other mixture-of-experts families or
Qwen3-MoE with dense layers, missing sizes) into one ConversionError. Writing starts from a template (the config.json the weights came
from) and sets only the fields we own, leaving a value untouched when it already equals ours (so
`1000000` stays an int): HF -> Megatron -> HF gives back the identical dict. Missing optional keys take
the defaults of the original config classes (InternVL/InternViT, SAIL-VL, AIMv2, Qwen2/Qwen3).
"""

import copy
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from sail_megatron.config import ConfigError, LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig
from sail_megatron.config.data import DataConfig
from sail_megatron.convert.errors import raise_if

MODEL_TYPE = "internvl_chat"
SAILVL_MODEL_TYPE = "sailvl"  # SAIL-VL2's top-level model_type (SAIL-VL-1.5/1.6 write internvl_chat)
MODEL_TYPES = (MODEL_TYPE, SAILVL_MODEL_TYPE)
QWEN2_ARCHITECTURE = "Qwen2ForCausalLM"
QWEN3_ARCHITECTURE = "Qwen3ForCausalLM"
QWEN3_MOE_ARCHITECTURE = "Qwen3MoeForCausalLM"
# AIMv2 vision configs: apple/ml-aim's AIMv2Config (SAIL-VL-1.5/1.6), its copy SAILViTConfig (SAIL-VL2),
# transformers' Aimv2VisionConfig (HF-native apple releases).
AIMV2_MODEL_TYPES = ("aimv2", "sailvit", "aimv2_vision_model")
AIMV2_ARCHITECTURES = ("AIMv2Model", "SAILViTModel", "Aimv2VisionModel")
AIMV2_TRANSFORMERS_MODEL_TYPE = "aimv2_vision_model"
_MISSING = object()

# Defaults of InternVL's InternVisionConfig / InternVLChatConfig and transformers' Qwen2Config for keys a
# config.json may omit (InternViT's own defaults describe the 6B model: rms_norm, qk-norm, no qkv bias).
VISION_DEFAULTS = {
    "layer_norm_eps": 1e-6,
    "drop_path_rate": 0.0,
    "initializer_factor": 0.1,
    "qkv_bias": False,
    "qk_normalization": True,
    "norm_type": "rms_norm",
    "hidden_act": "gelu",
    "num_channels": 3,
}
CHAT_DEFAULTS = {
    "select_layer": -1,
    "downsample_ratio": 0.5,
    "ps_version": "v1",
    "force_image_size": None,
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
}
LLM_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
    "hidden_act": "silu",
    "use_sliding_window": False,
}
# SAIL-VL's SailVLConfig / SAILVLConfig differ from InternVLChatConfig in one default.
SAILVL_CHAT_DEFAULTS = {**CHAT_DEFAULTS, "select_layer": -4}
# ml-aim AIMv2Config, SAILViTConfig and transformers' Aimv2VisionConfig agree on these defaults.
AIMV2_DEFAULTS = {
    "rms_norm_eps": 1e-5,
    "qkv_bias": False,
    "use_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "num_channels": 3,
    "is_native": False,
}
QWEN3_DEFAULTS = {**LLM_DEFAULTS, "head_dim": 128, "attention_bias": False}  # transformers' Qwen3Config
# transformers' Qwen3MoeConfig: no head_dim field (hidden / heads when absent), norm_topk_prob off by default;
# transformers 5 names `num_experts` `num_local_experts` in what it writes (the releases write num_experts).
QWEN3_MOE_DEFAULTS = {
    **LLM_DEFAULTS,
    "attention_bias": False,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts")

DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def read_json(path: Path) -> Dict[str, Any]:
    """A JSON file as a dict; a clear error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise_if([f"{path} does not exist"], f"cannot read {path.name}", "point at a Hugging Face model folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise_if([f"{path} is not valid JSON: {e}"], f"cannot read {path.name}")
    if not isinstance(data, dict):
        raise_if([f"{path} holds a {type(data).__name__}, not an object"], f"cannot read {path.name}")
    return data


def write_json(path: Path, data: Dict[str, Any]) -> None:
    """transformers' layout: indent 2, sorted keys, trailing newline."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _get(cfg: Dict[str, Any], key: str, defaults: Dict[str, Any], prefix: str, problems: List[str]):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if key in defaults:
        return defaults[key]
    problems.append(f"{prefix}.{key} is missing")
    return None


def _int(value, name: str, problems: List[str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if value is not None:
            problems.append(f"{name} must be an integer, got {value!r}")
        return 1
    return value


def _image_size(value, name: str, problems: List[str]) -> int:
    if isinstance(value, (list, tuple)):  # some configs write [448, 448]
        if len(value) != 2 or value[0] != value[1]:
            problems.append(f"{name} {value!r} is not square; only square tiles are supported")
            return 1
        value = value[0]
    return _int(value, name, problems)


def vision_arch_of(vcfg: Dict[str, Any]) -> str:
    """'aimv2' for AIMv2 / SAILViT configs (by model_type or architecture), else 'internvit'."""
    archs = vcfg.get("architectures") or []
    if vcfg.get("model_type") in AIMV2_MODEL_TYPES or any(a in AIMV2_ARCHITECTURES for a in archs):
        return "aimv2"
    return "internvit"


def _vision_sizes(g, prefix: str, problems: List[str]) -> Dict[str, int]:
    """The size fields both encoder families' configs name alike (g reads a key with its default)."""
    return dict(
        hidden_size=_int(g("hidden_size"), f"{prefix}.hidden_size", problems),
        num_layers=_int(g("num_hidden_layers"), f"{prefix}.num_hidden_layers", problems),
        num_attention_heads=_int(g("num_attention_heads"), f"{prefix}.num_attention_heads", problems),
        ffn_hidden_size=_int(g("intermediate_size"), f"{prefix}.intermediate_size", problems),
        image_size=_image_size(g("image_size"), f"{prefix}.image_size", problems),
        patch_size=_image_size(g("patch_size"), f"{prefix}.patch_size", problems),
    )


def _aimv2_from_hf(vcfg: Dict[str, Any], select_layer: int, problems: List[str], prefix: str) -> VisionConfig:
    g = lambda key: _get(vcfg, key, AIMV2_DEFAULTS, prefix, problems)  # noqa: E731
    if "vision_config" in vcfg or "text_config" in vcfg:
        problems.append(f"{prefix} describes a vision-text Aimv2Model: pass the config of the vision encoder alone")
    for key in ("qkv_bias", "use_bias", "mlp_bias"):
        if g(key):
            problems.append(
                f"{prefix}.{key} is true: only bias-free AIMv2 / SAILViT layers (as released) are supported"
            )
    if g("is_native"):
        problems.append(
            f"{prefix}.is_native is true: native-resolution AIMv2 (2D sin-cos positions, any image size) is not "
            "supported; use a fixed-resolution release with learned positions (e.g. aimv2-*-patch14-448)"
        )
    if g("hidden_act") != "silu":
        problems.append(f"{prefix}.hidden_act is {g('hidden_act')!r}: only 'silu' (SwiGLU) is supported")
    if g("num_channels") != 3:
        problems.append(f"{prefix}.num_channels is {g('num_channels')!r}: only RGB (3) is supported")
    if select_layer >= 0:
        problems.append(
            f"select_layer is {select_layer}: counted from the front, SAIL-VL's AIMv2 code (hidden states without "
            "the embeddings) and InternVL's counting differ by one layer; use a negative select_layer"
        )
    return VisionConfig(
        arch="aimv2",
        **_vision_sizes(g, prefix, problems),
        layernorm_epsilon=float(g("rms_norm_eps") or 0.0),
        select_layer=select_layer,
    )


def vision_from_hf(
    vcfg: Dict[str, Any], select_layer: int, problems: List[str], prefix: str = "vision_config"
) -> VisionConfig:
    """A vision config dict (InternVisionConfig, or AIMv2 fields) -> VisionConfig; appends what is unsupported."""
    if vision_arch_of(vcfg) == "aimv2":
        return _aimv2_from_hf(vcfg, select_layer, problems, prefix)
    g = lambda key: _get(vcfg, key, VISION_DEFAULTS, prefix, problems)  # noqa: E731
    if g("qk_normalization"):
        problems.append(f"{prefix}.qk_normalization is true: InternViT-6B style qk-norm is not supported")
    if g("norm_type") != "layer_norm":
        problems.append(f"{prefix}.norm_type is {g('norm_type')!r}: only 'layer_norm' (InternViT-300M) is supported")
    if not g("qkv_bias"):
        problems.append(f"{prefix}.qkv_bias is false: only InternViT with qkv bias is supported")
    if g("hidden_act") != "gelu":
        problems.append(f"{prefix}.hidden_act is {g('hidden_act')!r}: only 'gelu' is supported")
    if g("num_channels") != 3:
        problems.append(f"{prefix}.num_channels is {g('num_channels')!r}: only RGB (3) is supported")
    return VisionConfig(
        **_vision_sizes(g, prefix, problems),
        layernorm_epsilon=float(g("layer_norm_eps") or 0.0),
        select_layer=select_layer,
        drop_path_rate=float(g("drop_path_rate") or 0.0),
        layer_scale_init=float(g("initializer_factor") or 0.0),
    )


def rope_theta_of(lcfg: Dict[str, Any]) -> Optional[float]:
    """Qwen2's rope theta: `rope_theta` (transformers 4) or `rope_parameters.rope_theta` (transformers 5)."""
    if lcfg.get("rope_theta") is not None:
        return float(lcfg["rope_theta"])
    params = lcfg.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return None


def language_arch_of(lcfg: Dict[str, Any]) -> Optional[str]:
    """'qwen2', 'qwen3' (dense) or 'qwen3_moe' by architecture or model_type; None for anything else."""
    archs = lcfg.get("architectures") or []
    if QWEN2_ARCHITECTURE in archs or lcfg.get("model_type") == "qwen2":
        return "qwen2"
    if QWEN3_ARCHITECTURE in archs or lcfg.get("model_type") == "qwen3":
        return "qwen3"
    if QWEN3_MOE_ARCHITECTURE in archs or lcfg.get("model_type") == "qwen3_moe":
        return "qwen3_moe"
    return None


def _is_moe(lcfg: Dict[str, Any]) -> bool:
    archs = lcfg.get("architectures") or []
    return bool(
        "moe" in str(lcfg.get("model_type", "")).lower()
        or any("moe" in str(a).lower() for a in archs)
        or lcfg.get("num_experts")
    )


def language_from_hf(
    lcfg: Dict[str, Any], problems: List[str], prefix: str = "llm_config", make_vocab_size_divisible_by: int = 128
) -> LanguageConfig:
    """A Qwen2 or dense Qwen3 config dict -> LanguageConfig; appends what is unsupported."""
    archs = lcfg.get("architectures") or []
    arch = language_arch_of(lcfg)
    supported = (
        f"only {QWEN2_ARCHITECTURE} (Qwen2 / Qwen2.5), {QWEN3_ARCHITECTURE} (dense Qwen3) and "
        f"{QWEN3_MOE_ARCHITECTURE} (Qwen3-MoE) language models are supported"
    )
    if arch is None or (arch != "qwen3_moe" and _is_moe(lcfg)):
        kind = ", a mixture-of-experts language model" if _is_moe(lcfg) else ""
        problems.append(f"{prefix} describes {archs or lcfg.get('model_type')!r}{kind}: {supported}")
        arch = "qwen3" if kind else "qwen2"  # read the rest as the nearest family (MoE releases are Qwen3-like)
    defaults = {"qwen3": QWEN3_DEFAULTS, "qwen3_moe": QWEN3_MOE_DEFAULTS}.get(arch, LLM_DEFAULTS)
    g = lambda key: _get(lcfg, key, defaults, prefix, problems)  # noqa: E731
    if g("hidden_act") != "silu":
        problems.append(f"{prefix}.hidden_act is {g('hidden_act')!r}: only 'silu' (SwiGLU) is supported")
    if g("use_sliding_window"):
        problems.append(f"{prefix}.use_sliding_window is true: sliding-window attention is not supported")
    if lcfg.get("rope_scaling"):
        problems.append(f"{prefix}.rope_scaling is {lcfg['rope_scaling']!r}: only plain RoPE is supported")
    params = lcfg.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_type", "default") != "default":
        problems.append(f"{prefix}.rope_parameters.rope_type is {params['rope_type']!r}: only 'default' is supported")
    hidden = _int(g("hidden_size"), f"{prefix}.hidden_size", problems)
    heads = _int(g("num_attention_heads"), f"{prefix}.num_attention_heads", problems)
    moe: Dict[str, Any] = {}
    if arch in ("qwen3", "qwen3_moe"):  # q/k norms, no biases, an explicit head width
        if g("attention_bias"):
            problems.append(f"{prefix}.attention_bias is true: only Qwen3 without q/k/v/o biases is supported")
        if arch == "qwen3_moe" and lcfg.get("head_dim") is None:  # Qwen3MoeConfig: hidden / heads
            head_dim: Optional[int] = hidden // heads if heads else None
        else:
            head_dim = _int(g("head_dim"), f"{prefix}.head_dim", problems)
        if arch == "qwen3_moe":
            moe = _moe_from_hf(lcfg, g, prefix, problems)
    else:
        head_dim = lcfg.get("head_dim")
        if head_dim is not None and heads and head_dim * heads != hidden:
            problems.append(f"{prefix}.head_dim {head_dim} x {heads} heads != hidden_size {hidden}: unsupported")
        head_dim = None
    theta = rope_theta_of(lcfg)
    return LanguageConfig(
        arch=arch,
        head_dim=head_dim,
        hidden_size=hidden,
        num_layers=_int(g("num_hidden_layers"), f"{prefix}.num_hidden_layers", problems),
        num_attention_heads=heads,
        num_query_groups=_int(lcfg.get("num_key_value_heads") or heads, f"{prefix}.num_key_value_heads", problems),
        ffn_hidden_size=_int(g("intermediate_size"), f"{prefix}.intermediate_size", problems),
        vocab_size=_int(g("vocab_size"), f"{prefix}.vocab_size", problems),
        rope_theta=theta if theta is not None else LLM_DEFAULTS["rope_theta"],
        norm_epsilon=float(g("rms_norm_eps") or 0.0),
        tie_word_embeddings=bool(g("tie_word_embeddings")),
        max_position_embeddings=_int(g("max_position_embeddings"), f"{prefix}.max_position_embeddings", problems),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        **moe,
    )


def num_experts_key(lcfg: Dict[str, Any]) -> str:
    """Where a Qwen3-MoE config keeps its expert count: `num_experts` (the releases) or `num_local_experts`
    (transformers 5's own writing)."""
    return next((k for k in NUM_EXPERTS_KEYS if lcfg.get(k) is not None), NUM_EXPERTS_KEYS[0])


def _moe_from_hf(lcfg: Dict[str, Any], g, prefix: str, problems: List[str]) -> Dict[str, Any]:
    """Qwen3-MoE's expert fields -> LanguageConfig's; every layer must be an MoE layer (as Qwen3-30B-A3B)."""
    sparse_step, dense_layers = g("decoder_sparse_step"), g("mlp_only_layers") or []
    if sparse_step != 1 or dense_layers:
        problems.append(
            f"{prefix} has dense MLP layers (decoder_sparse_step {sparse_step!r}, mlp_only_layers {dense_layers!r}): "
            "only Qwen3-MoE models whose every layer is a mixture of experts (decoder_sparse_step 1, "
            "mlp_only_layers []) are supported"
        )
    if lcfg.get("shared_expert_intermediate_size"):
        problems.append(f"{prefix}.shared_expert_intermediate_size is set: shared experts are not supported")
    key = num_experts_key(lcfg)
    experts = lcfg[key] if lcfg.get(key) is not None else QWEN3_MOE_DEFAULTS["num_experts"]
    coeff = g("router_aux_loss_coef")
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or coeff < 0:
        problems.append(f"{prefix}.router_aux_loss_coef must be a number >= 0, got {coeff!r}")
        coeff = 0.0
    return dict(
        num_experts=_int(experts, f"{prefix}.{key}", problems),
        moe_ffn_hidden_size=_int(g("moe_intermediate_size"), f"{prefix}.moe_intermediate_size", problems),
        moe_router_topk=_int(g("num_experts_per_tok"), f"{prefix}.num_experts_per_tok", problems),
        moe_norm_topk_prob=bool(g("norm_topk_prob")),
        moe_aux_loss_coeff=float(coeff),
    )


def model_config_from_hf(
    config: Dict[str, Any], make_vocab_size_divisible_by: int = 128, source: str = "config.json"
) -> ModelConfig:
    """An InternVL-chat config.json dict -> a validated ModelConfig. Raises ConversionError listing every
    problem found."""
    problems: List[str] = []
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        problems.append(
            f"model_type is {model_type!r}, expected {MODEL_TYPE!r} or {SAILVL_MODEL_TYPE!r} "
            "(SAIL-VL / InternVL-chat layout)"
        )
    for section in ("vision_config", "llm_config"):
        if not isinstance(config.get(section), dict):
            problems.append(f"{section} is missing or not an object")
    # Without the right type and both sections nothing further can be read meaningfully.
    raise_if(problems, f"unsupported model in {source}", "convert a SAIL-VL / InternVL-chat checkpoint")
    defaults = chat_defaults(config)
    g = lambda key: _get(config, key, defaults, "config", problems)  # noqa: E731
    for lora in ("use_backbone_lora", "use_llm_lora"):
        if g(lora):
            problems.append(f"{lora} is {g(lora)}: merge the LoRA weights before converting")
    vision = vision_from_hf(config["vision_config"], _int(g("select_layer"), "select_layer", problems), problems)
    force = g("force_image_size")
    if force is not None and _image_size(force, "force_image_size", problems) != vision.image_size:
        problems.append(
            f"force_image_size {force} differs from vision_config.image_size {vision.image_size}: "
            "resized position embeddings are not supported"
        )
    language = language_from_hf(
        config["llm_config"], problems, make_vocab_size_divisible_by=make_vocab_size_divisible_by
    )
    projector = ProjectorConfig(downsample_ratio=float(g("downsample_ratio") or 0.0), ps_version=g("ps_version"))
    model = ModelConfig(vision=vision, projector=projector, language=language)
    if not problems:
        try:
            model.validate()
        except ConfigError as e:
            problems.append(str(e))
    raise_if(
        problems,
        f"unsupported model in {source}",
        "convert a SAIL-VL / InternVL-chat model with an InternViT-300M style or AIMv2 / SAILViT "
        "vision encoder and a Qwen2, dense Qwen3 or Qwen3-MoE language model",
    )
    return model


def chat_defaults(config: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults of the config class that reads `config`: SAIL-VL's (select_layer -4) when its model_type or
    its AutoConfig names it, else InternVLChatConfig's."""
    auto = (config.get("auto_map") or {}).get("AutoConfig", "") if isinstance(config.get("auto_map"), dict) else ""
    if config.get("model_type") == SAILVL_MODEL_TYPE or "sailvl" in str(auto).lower():
        return SAILVL_CHAT_DEFAULTS
    return CHAT_DEFAULTS


def _put(d: Dict[str, Any], key: str, value, default=_MISSING) -> None:
    """Set `key` unless the template already holds an equal value (or omits it and the default is ours)."""
    if key in d:
        if d[key] != value or isinstance(d[key], bool) != isinstance(value, bool):
            d[key] = value
    elif default is _MISSING or default != value:
        d[key] = value


def _put_image_size(d: Dict[str, Any], key: str, size: int, default=_MISSING) -> None:
    if isinstance(d.get(key), (list, tuple)) and list(d[key]) == [size, size]:
        return
    _put(d, key, size, default)


def _put_rope_theta(lcfg: Dict[str, Any], theta: float) -> None:
    params = lcfg.get("rope_parameters")
    if "rope_theta" not in lcfg and isinstance(params, dict):
        _put(params, "rope_theta", theta)
    else:
        _put(lcfg, "rope_theta", theta, LLM_DEFAULTS["rope_theta"])


def _put_aimv2(vcfg: Dict[str, Any], vision: VisionConfig, sail2: bool) -> None:
    """Our fields into an AIMv2 config dict; a fresh one (no model_type) gets every field explicit, in the
    ml-aim AIMv2Config form SAIL-VL-1.6 ships (SAILViTConfig, the same fields, for SAIL-VL2)."""
    fresh = "model_type" not in vcfg
    default = (lambda key: _MISSING) if fresh else (lambda key: AIMV2_DEFAULTS[key])  # noqa: E731
    _put(vcfg, "hidden_size", vision.hidden_size)
    _put(vcfg, "num_hidden_layers", vision.num_layers)
    _put(vcfg, "num_attention_heads", vision.num_attention_heads)
    _put(vcfg, "intermediate_size", vision.ffn_hidden_size)
    _put_image_size(vcfg, "image_size", vision.image_size)
    _put_image_size(vcfg, "patch_size", vision.patch_size)
    _put(vcfg, "rms_norm_eps", vision.layernorm_epsilon, default("rms_norm_eps"))
    for key in ("qkv_bias", "use_bias"):
        _put(vcfg, key, False, default(key))
    if fresh:
        vcfg["num_channels"] = 3
        vcfg["architectures"] = ["SAILViTModel"] if sail2 else ["AIMv2Model"]
        vcfg["model_type"] = "sailvit" if sail2 else "aimv2"


def put_vision(vcfg: Dict[str, Any], vision: VisionConfig, sail2: bool = False) -> None:
    """Write our vision fields into an InternViT or AIMv2 config dict in place (`sail2`: a SAIL-VL2 config)."""
    if vision.arch == "aimv2":
        _put_aimv2(vcfg, vision, sail2)
        return
    _put(vcfg, "hidden_size", vision.hidden_size)
    _put(vcfg, "num_hidden_layers", vision.num_layers)
    _put(vcfg, "num_attention_heads", vision.num_attention_heads)
    _put(vcfg, "intermediate_size", vision.ffn_hidden_size)
    _put_image_size(vcfg, "image_size", vision.image_size)
    _put_image_size(vcfg, "patch_size", vision.patch_size)
    _put(vcfg, "layer_norm_eps", vision.layernorm_epsilon, VISION_DEFAULTS["layer_norm_eps"])
    _put(vcfg, "drop_path_rate", vision.drop_path_rate, VISION_DEFAULTS["drop_path_rate"])
    _put(vcfg, "initializer_factor", vision.layer_scale_init, VISION_DEFAULTS["initializer_factor"])
    for key, value in (("qkv_bias", True), ("qk_normalization", False), ("norm_type", "layer_norm")):
        _put(vcfg, key, value)
    vcfg.setdefault("architectures", ["InternVisionModel"])
    vcfg.setdefault("model_type", "intern_vit_6b")  # InternViT's config class uses this name for all sizes


def put_language(lcfg: Dict[str, Any], lang: LanguageConfig) -> None:
    """Write our language fields into a Qwen2 or Qwen3 config dict in place."""
    fresh = "model_type" not in lcfg and not lcfg.get("architectures")
    _put(lcfg, "hidden_size", lang.hidden_size)
    _put(lcfg, "num_hidden_layers", lang.num_layers)
    _put(lcfg, "num_attention_heads", lang.num_attention_heads)
    _put(lcfg, "num_key_value_heads", lang.num_query_groups)
    _put(lcfg, "intermediate_size", lang.ffn_hidden_size)
    _put(lcfg, "vocab_size", lang.vocab_size)
    _put_rope_theta(lcfg, lang.rope_theta)
    _put(lcfg, "rms_norm_eps", lang.norm_epsilon, LLM_DEFAULTS["rms_norm_eps"])
    _put(lcfg, "tie_word_embeddings", lang.tie_word_embeddings, LLM_DEFAULTS["tie_word_embeddings"])
    _put(lcfg, "max_position_embeddings", lang.max_position_embeddings, LLM_DEFAULTS["max_position_embeddings"])
    if lang.arch == "qwen3":
        _put(lcfg, "head_dim", lang.kv_channels, _MISSING if fresh else QWEN3_DEFAULTS["head_dim"])
        _put(lcfg, "attention_bias", False, _MISSING if fresh else QWEN3_DEFAULTS["attention_bias"])
    if lang.is_moe:
        _put_moe(lcfg, lang, fresh)
    if not lcfg.get("architectures"):
        lcfg["architectures"] = [lang.spec.hf_architecture]
    lcfg.setdefault("model_type", lang.spec.hf_model_type)


def _put_moe(lcfg: Dict[str, Any], lang: LanguageConfig, fresh: bool) -> None:
    """Qwen3-MoE's fields (a fresh config gets every one explicit: Qwen3MoeConfig's defaults are not ours)."""
    default = (lambda key: _MISSING) if fresh else (lambda key: QWEN3_MOE_DEFAULTS[key])  # noqa: E731
    head_default = _MISSING if fresh else lang.hidden_size // lang.num_attention_heads
    _put(lcfg, "head_dim", lang.kv_channels, head_default)
    _put(lcfg, "attention_bias", False, default("attention_bias"))
    _put(lcfg, num_experts_key(lcfg), lang.num_experts, default("num_experts"))
    _put(lcfg, "num_experts_per_tok", lang.moe_router_topk, default("num_experts_per_tok"))
    _put(lcfg, "moe_intermediate_size", lang.moe_ffn_hidden_size, default("moe_intermediate_size"))
    _put(lcfg, "norm_topk_prob", lang.moe_norm_topk_prob, default("norm_topk_prob"))
    _put(lcfg, "router_aux_loss_coef", lang.moe_aux_loss_coeff, default("router_aux_loss_coef"))
    _put(lcfg, "decoder_sparse_step", 1, default("decoder_sparse_step"))
    _put(lcfg, "mlp_only_layers", [], default("mlp_only_layers"))


def _fresh_identity(model: ModelConfig) -> Tuple[str, str]:
    """(model_type, architecture) of a config written from scratch, as the family's releases name them."""
    if model.vision.arch != "aimv2":
        return MODEL_TYPE, "InternVLChatModel"
    if model.language.arch in ("qwen3", "qwen3_moe"):
        return SAILVL_MODEL_TYPE, "SAILVLModel"  # SAIL-VL2 (dense or mixture of experts)
    return MODEL_TYPE, "SailVLModel"  # SAIL-VL-1.5 / 1.6


def _section(out: Dict[str, Any], key: str, same_family: bool) -> Dict[str, Any]:
    """The template's sub-config, or a fresh one when it describes another family than the model."""
    if not isinstance(out.get(key), dict) or not same_family:
        out[key] = {}
    return out[key]


def sail_vision_config(vcfg: Dict[str, Any]) -> Dict[str, Any]:
    """A standalone vision config as a SAIL-VL config.json carries it: transformers' Aimv2VisionConfig becomes
    ml-aim's AIMv2Config (its weights are renamed alike); anything else is returned as is (a copy)."""
    out = copy.deepcopy(vcfg)
    if out.get("model_type") != AIMV2_TRANSFORMERS_MODEL_TYPE:
        return out
    for key in ("use_head", "is_native", "auto_map"):
        out.pop(key, None)
    out["use_bias"] = bool(out.pop("mlp_bias", False))
    out.update(model_type="aimv2", architectures=["AIMv2Model"])
    return out


def hf_config_from_model(model: ModelConfig, template: Dict[str, Any], dtype: Optional[str] = None) -> Dict[str, Any]:
    """The InternVL-chat config.json for `model`: `template` with our fields set (template unchanged).
    `dtype` ('bf16', 'fp32', 'fp16') updates the recorded torch dtype when it differs."""
    out = copy.deepcopy(template)
    model_type, architecture = _fresh_identity(model)
    if out.get("model_type") not in MODEL_TYPES:
        out["model_type"] = model_type
    out.setdefault("architectures", [architecture])
    defaults = chat_defaults(out)
    _put(out, "select_layer", model.vision.select_layer, defaults["select_layer"])
    _put(out, "downsample_ratio", model.projector.downsample_ratio, defaults["downsample_ratio"])
    _put(out, "ps_version", model.projector.ps_version, defaults["ps_version"])
    if out.get("force_image_size") is not None:
        _put_image_size(out, "force_image_size", model.vision.image_size)
    vcfg, lcfg = out.get("vision_config") or {}, out.get("llm_config") or {}
    same_vision = not vcfg or vision_arch_of(vcfg) == model.vision.arch
    same_language = not lcfg or language_arch_of(lcfg) in (None, model.language.arch)
    put_vision(_section(out, "vision_config", same_vision), model.vision, out["model_type"] == SAILVL_MODEL_TYPE)
    put_language(_section(out, "llm_config", same_language), model.language)
    if dtype is not None:
        name = DTYPE_NAMES[dtype]
        for key in ("torch_dtype", "dtype"):
            if key in out and out[key] != name:
                out[key] = name
        if "torch_dtype" not in out and "dtype" not in out:
            out["torch_dtype"] = name
    return out


TRAINED_PROMPT_KEY = "sail_trained_prompt"
"""config.json key of a trainer export: the chat template name and system message the run trained with
(InternVL-chat's remote code ignores it; `template` holds the nearest name that code knows)."""


def data_from_hf_config(config: Dict[str, Any], tokenizer: Optional[Path] = None) -> DataConfig:
    """How an InternVL-chat model renders its prompts, from its config.json (InternVLChatConfig's defaults
    for absent keys: one tile without dynamic_image_size, no thumbnail)."""
    dynamic = bool(config.get("dynamic_image_size", False))
    max_tiles = int(config.get("max_dynamic_patch", 6)) if dynamic else 1
    trained = config.get(TRAINED_PROMPT_KEY) or {}  # a trainer export: the prompt exactly as trained
    return DataConfig(
        tokenizer=str(tokenizer) if tokenizer is not None else "",
        template=str(trained.get("template") or config.get("template") or ""),
        system_prompt=trained.get("system_prompt"),
        min_tiles=min(int(config.get("min_dynamic_patch", 1)), max_tiles),
        max_tiles=max_tiles,
        use_thumbnail=bool(config.get("use_thumbnail", False)),
    )


def stage1_template(
    llm_config: Dict[str, Any], vision_config: Dict[str, Any], template: str, dtype: str
) -> Dict[str, Any]:
    """A fresh InternVL-chat config around a standalone language and vision config (for `init`); its
    model_type and architecture follow the family (`hf_config_from_model`)."""
    return {
        "llm_config": copy.deepcopy(llm_config),
        "vision_config": sail_vision_config(vision_config),
        "template": template,
        "force_image_size": vision_config.get("image_size"),
        # Written explicitly (hf_config_from_model sets our values), so a reader need not know defaults.
        "select_layer": CHAT_DEFAULTS["select_layer"],
        "downsample_ratio": CHAT_DEFAULTS["downsample_ratio"],
        "ps_version": CHAT_DEFAULTS["ps_version"],
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 6,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": DTYPE_NAMES[dtype],
    }
