"""Tiny random SAIL-VL (InternVL-chat) checkpoints built from `transformers` modules, and their logits.

The weights come from real `transformers` models (Qwen2ForCausalLM or Qwen3ForCausalLM;
InternVLVisionModel or Aimv2VisionModel) with every parameter randomized (biases, norms and layer scales
too, so a swapped tensor cannot hide behind an init value). They are written under InternVL-chat /
SAIL-VL names (InternViT, or AIMv2 under apple/ml-aim's names as SAIL-VL-1.6 and SAIL-VL2 ship it) by a
mapping written here, independently of the library's, and `expected_logits` runs those very modules with
InternVL's / SAIL-VL's glue (pixel shuffle in InternVL's own view/permute form), so a test compares the
converted megatron model with third-party code, not with our own reference.

Layouts (`Spec.vision_arch`, `Spec.llm_arch`): InternViT + Qwen2 (SAIL-VL-2B, InternVL-chat), AIMv2 +
Qwen2 (SAIL-VL-1.5/1.6: `model_type` internvl_chat, `SailVLModel`), AIMv2 + Qwen3 or Qwen3-MoE (SAIL-VL2:
`sailvl`, vision `sailvit`). Qwen3-MoE's experts are written per expert (`mlp.experts.E.{gate,up,down}_proj`,
as its releases and transformers' save_pretrained store them), split here from transformers 5's fused
in-memory tensors.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import save_file
from torch import nn

IMG_CONTEXT_ID = 299


@dataclass(frozen=True)
class Spec:
    """Shapes of the tiny model (TP 2 and PP 2 divide it; the vocabulary pads differently at TP 1 and 2)."""

    vision_layers: int = 3
    vision_hidden: int = 32
    vision_heads: int = 4
    vision_ffn: int = 64
    image_size: int = 56
    patch_size: int = 14
    llm_layers: int = 2
    llm_hidden: int = 64
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_ffn: int = 96
    vocab: int = 300
    tied: bool = False
    lm_head_stored: bool = False
    """With tied embeddings, also store `lm_head.weight` (some releases do)."""
    select_layer: int = -1
    vision_arch: str = "internvit"
    """'internvit' or 'aimv2' (SAILViT)."""
    vision_head: bool = False
    """AIMv2: build transformers' attention-pooling head too (standalone HF-native releases may carry one)."""
    llm_arch: str = "qwen2"
    """'qwen2', 'qwen3' or 'qwen3_moe'."""
    experts: int = 4
    """Qwen3-MoE: routed experts per layer (`num_experts`), top `topk`, each of FFN width `moe_ffn`."""
    topk: int = 2
    moe_ffn: int = 32
    norm_topk: bool = True
    head_dim: Optional[int] = None
    """Qwen3's explicit head width (may differ from hidden / heads)."""
    ps_version: str = "v2"
    downsample_ratio: float = 0.5
    dtype: torch.dtype = torch.float32
    seed: int = 0

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // round(1 / self.downsample_ratio) ** 2


@dataclass
class Modules:
    qwen: nn.Module
    vit: nn.Module
    mlp1: nn.Sequential
    spec: Spec


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_scale = (
                name.endswith(
                    (
                        "norm.weight",
                        "layernorm.weight",
                        "layernorm_before.weight",
                        "layernorm_after.weight",
                        "norm1.weight",
                        "norm2.weight",
                    )
                )
                or ".0.weight" in name
                and p.dim() == 1
            )
            # Routers get wider logits: top-k choices then stand clear of float noise between implementations.
            p.copy_(1.0 + 0.1 * noise if is_scale else (0.5 if name.endswith("mlp.gate.weight") else 0.08) * noise)


def _build_qwen(spec: Spec) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        hidden_size=spec.llm_hidden,
        intermediate_size=spec.llm_ffn,
        num_hidden_layers=spec.llm_layers,
        num_attention_heads=spec.llm_heads,
        num_key_value_heads=spec.llm_kv_heads,
        vocab_size=spec.vocab,
        tie_word_embeddings=spec.tied,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    if spec.llm_arch == "qwen3":
        return Qwen3ForCausalLM(
            Qwen3Config(**common, head_dim=spec.head_dim, attention_bias=False, architectures=["Qwen3ForCausalLM"])
        )
    if spec.llm_arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(
            **common,
            head_dim=spec.head_dim,
            attention_bias=False,
            num_experts=spec.experts,
            num_experts_per_tok=spec.topk,
            moe_intermediate_size=spec.moe_ffn,
            norm_topk_prob=spec.norm_topk,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=0.001,
            architectures=["Qwen3MoeForCausalLM"],
        )
        config._experts_implementation = "eager"  # the per-expert loop: the plainest reference
        return Qwen3MoeForCausalLM(config)
    return Qwen2ForCausalLM(Qwen2Config(**common, architectures=["Qwen2ForCausalLM"]))


def _build_aimv2(spec: Spec) -> nn.Module:
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    return Aimv2VisionModel(
        Aimv2VisionConfig(
            hidden_size=spec.vision_hidden,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            intermediate_size=spec.vision_ffn,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            rms_norm_eps=1e-5,
            qkv_bias=False,
            mlp_bias=False,
            use_head=spec.vision_head,
            is_native=False,
            attn_implementation="eager",
        )
    )


def build_modules(spec: Spec) -> Modules:
    from transformers.models.internvl import InternVLVisionConfig, InternVLVisionModel

    torch.manual_seed(spec.seed)
    qwen = _build_qwen(spec)
    vit = (
        _build_aimv2(spec)
        if spec.vision_arch == "aimv2"
        else InternVLVisionModel(
            InternVLVisionConfig(
                hidden_size=spec.vision_hidden,
                num_hidden_layers=spec.vision_layers,
                num_attention_heads=spec.vision_heads,
                intermediate_size=spec.vision_ffn,
                image_size=[spec.image_size] * 2,
                patch_size=[spec.patch_size] * 2,
                use_qk_norm=False,
                attention_bias=True,
                norm_type="layer_norm",
                use_mean_pooling=False,
                layer_norm_eps=1e-6,
                attn_implementation="eager",
            )
        )
    )
    k = round(1 / spec.downsample_ratio)
    width = spec.vision_hidden * k * k
    mlp1 = nn.Sequential(
        nn.LayerNorm(width), nn.Linear(width, spec.llm_hidden), nn.GELU(), nn.Linear(spec.llm_hidden, spec.llm_hidden)
    )
    gen = torch.Generator().manual_seed(spec.seed + 1)
    for m in (qwen, vit, mlp1):
        _randomize(m, gen)
        m.to(spec.dtype).eval()
    if spec.tied:
        assert qwen.lm_head.weight is qwen.model.embed_tokens.weight
    return Modules(qwen, vit, mlp1, spec)


def internvit_tensors(vit: nn.Module, prefix: str) -> Dict[str, torch.Tensor]:
    """transformers InternVLVisionModel -> InternViT names (attn.qkv = [q; k; v] rows)."""
    sd = vit.state_dict()
    out = {
        f"{prefix}embeddings.class_embedding": sd["embeddings.cls_token"],
        f"{prefix}embeddings.position_embedding": sd["embeddings.position_embeddings"],
        f"{prefix}embeddings.patch_embedding.weight": sd["embeddings.patch_embeddings.projection.weight"],
        f"{prefix}embeddings.patch_embedding.bias": sd["embeddings.patch_embeddings.projection.bias"],
    }
    for i in range(vit.config.num_hidden_layers):
        s, d = f"encoder.layer.{i}.", f"{prefix}encoder.layers.{i}."
        for wb in ("weight", "bias"):
            out[d + f"attn.qkv.{wb}"] = torch.cat([sd[s + f"attention.{p}_proj.{wb}"] for p in "qkv"])
            out[d + f"attn.proj.{wb}"] = sd[s + f"attention.projection_layer.{wb}"]
            out[d + f"mlp.fc1.{wb}"] = sd[s + f"mlp.fc1.{wb}"]
            out[d + f"mlp.fc2.{wb}"] = sd[s + f"mlp.fc2.{wb}"]
            out[d + f"norm1.{wb}"] = sd[s + f"layernorm_before.{wb}"]
            out[d + f"norm2.{wb}"] = sd[s + f"layernorm_after.{wb}"]
        out[d + "ls1"] = sd[s + "lambda_1"]
        out[d + "ls2"] = sd[s + "lambda_2"]
    return {n: t.clone() for n, t in out.items()}


AIMV2_BLOCK_TENSORS = tuple(
    f"{n}.weight" for n in ("norm_1", "norm_2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.fc3")
)


def aimv2_tensors(vit: nn.Module, prefix: str) -> Dict[str, torch.Tensor]:
    """transformers Aimv2VisionModel -> apple/ml-aim names, as SAIL-VL-1.6 / SAIL-VL2 store them
    (attn.qkv = [q; k; v] rows, mlp fc1 = gate, fc2 = down, fc3 = up, pos_embed [1, N, H]; no head)."""
    sd = vit.state_dict()
    out = {
        f"{prefix}preprocessor.patchifier.proj.weight": sd["embeddings.patch_embed.weight"],
        f"{prefix}preprocessor.patchifier.proj.bias": sd["embeddings.patch_embed.bias"],
        f"{prefix}preprocessor.patchifier.norm.weight": sd["embeddings.rms_norm.weight"],
        f"{prefix}preprocessor.pos_embed": sd["embeddings.position_embedding.weight"][None],
        f"{prefix}trunk.post_trunk_norm.weight": sd["rms_norm.weight"],
    }
    for i in range(vit.config.num_hidden_layers):
        s, d = f"encoder.layers.{i}.", f"{prefix}trunk.blocks.{i}."
        out[d + "attn.qkv.weight"] = torch.cat([sd[s + f"attention.{p}_proj.weight"] for p in "qkv"])
        out[d + "attn.proj.weight"] = sd[s + "attention.out_proj.weight"]
        out[d + "mlp.fc1.weight"] = sd[s + "ffn.gate_proj.weight"]
        out[d + "mlp.fc2.weight"] = sd[s + "ffn.down_proj.weight"]
        out[d + "mlp.fc3.weight"] = sd[s + "ffn.up_proj.weight"]
        out[d + "norm_1.weight"] = sd[s + "rms_norm1.weight"]
        out[d + "norm_2.weight"] = sd[s + "rms_norm2.weight"]
    return {n: t.clone() for n, t in out.items()}


def vision_tensors(modules: "Modules", prefix: str) -> Dict[str, torch.Tensor]:
    if modules.spec.vision_arch == "aimv2":
        return aimv2_tensors(modules.vit, prefix)
    return internvit_tensors(modules.vit, prefix)


def _split_experts(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers 5's fused Qwen3-MoE experts -> the per-expert names releases store: `gate_up_proj[E]` is
    [gate; up] (its forward chunks the product in two, gate first), `down_proj[E]` the expert's down."""
    out = {}
    for n, t in sd.items():
        if n.endswith("mlp.experts.gate_up_proj"):
            base = n[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate, up
        elif n.endswith("mlp.experts.down_proj"):
            base = n[: -len("down_proj")]
            out.update({f"{base}{e}.down_proj.weight": t[e] for e in range(t.shape[0])})
        else:
            out[n] = t
    return out


def qwen_tensors(qwen: nn.Module, prefix: str, lm_head_stored: bool) -> Dict[str, torch.Tensor]:
    out = {prefix + n: t.clone() for n, t in _split_experts(qwen.state_dict()).items()}
    if qwen.config.tie_word_embeddings and not lm_head_stored:
        out.pop(prefix + "lm_head.weight", None)
    return out


def internvit_config(spec: Spec) -> Dict:
    """A standalone InternViT-300M style config.json (InternVisionConfig fields)."""
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": spec.vision_hidden,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "intermediate_size": spec.vision_ffn,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "qk_normalization": False,
        "norm_type": "layer_norm",
        "hidden_act": "gelu",
        "drop_path_rate": 0.1,
        "initializer_factor": 0.1,
        "num_channels": 3,
        "use_flash_attn": False,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 1e-10,
    }


def aimv2_config(spec: Spec, sail2: bool = False) -> Dict:
    """An ml-aim AIMv2Config as SAIL-VL-1.6 ships it (SAIL-VL2: the same fields as SAILViTConfig)."""
    name = "sailvit" if sail2 else "aimv2"
    cls = "SAILViT" if sail2 else "AIMv2"
    return {
        "architectures": [f"{cls}Model"],
        "auto_map": {
            "AutoConfig": f"configuration_{name}.{cls}Config",
            "AutoModel": f"modeling_{name}.{cls}Model",
        },
        "model_type": name,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_ffn,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "num_channels": 3,
        "patch_size": spec.patch_size,
        "image_size": spec.image_size,
        "rms_norm_eps": 1e-05,
        "qkv_bias": False,
        "use_bias": False,
        "attention_dropout": 0.0,
        "projection_dropout": 0.0,
        "tie_word_embeddings": True,
        "torch_dtype": str(spec.dtype).replace("torch.", ""),
    }


def llm_config(spec: Spec, qwen: nn.Module) -> Dict:
    llm = qwen.config.to_dict()
    names = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
    llm["architectures"] = [names.get(spec.llm_arch, "Qwen2ForCausalLM")]
    if "num_local_experts" in llm:  # transformers 5's name; Qwen3-30B-A3B's config.json says num_experts
        llm["num_experts"] = llm.pop("num_local_experts")
    return llm


def chat_config(spec: Spec, qwen: nn.Module) -> Dict:
    if spec.vision_arch == "aimv2":
        return sail_config(spec, qwen)
    llm = llm_config(spec, qwen)
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
        "llm_config": llm,
        "vision_config": internvit_config(spec),
        "select_layer": spec.select_layer,
        "downsample_ratio": spec.downsample_ratio,
        "ps_version": spec.ps_version,
        "template": "internvl2_5",
        "force_image_size": spec.image_size,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
        "torch_dtype": str(spec.dtype).replace("torch.", ""),
    }


def sail_config(spec: Spec, qwen: nn.Module) -> Dict:
    """SAIL-VL-1.6's config.json layout (AIMv2 + Qwen2), or SAIL-VL2's (AIMv2 + Qwen3)."""
    sail2 = spec.llm_arch in ("qwen3", "qwen3_moe")
    cls = "SAILVL" if sail2 else "SailVL"
    return {
        "architectures": [f"{cls}Model"],
        "auto_map": {
            "AutoConfig": f"configuration_sailvl.{cls}Config",
            "AutoModel": f"modeling_sailvl.{'SAILVLModel' if sail2 else 'CustomSailVLModel'}",
        },
        "model_type": "sailvl" if sail2 else "internvl_chat",
        "llm_config": llm_config(spec, qwen),
        "vision_config": aimv2_config(spec, sail2),
        "select_layer": spec.select_layer,
        "downsample_ratio": spec.downsample_ratio,
        "ps_version": spec.ps_version,
        "template": "univl-chat" if sail2 else "sailvl-chat",
        "force_image_size": spec.image_size,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": str(spec.dtype).replace("torch.", ""),
    }


def write_tokenizer(folder: Path, vocab: int) -> None:
    """Tokenizer files our tools parse (not a loadable tokenizer: conversion only looks up ids)."""
    added = [
        {"id": vocab - 3, "content": "<img>"},
        {"id": vocab - 2, "content": "</img>"},
        {"id": vocab - 1, "content": "<IMG_CONTEXT>"},
    ]
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": added, "model": {"type": "BPE"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))


def _save_sharded(tensors: Dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    names = list(tensors)
    files = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / fname), metadata={"format": "pt"})
        files.update({n: fname for n in part})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))


def write_chat_checkpoint(folder: Path, modules: Modules, shards: int = 2, config_edit: Optional[dict] = None) -> Path:
    """An InternVL-chat folder: config.json, safetensors shards + index, tokenizer and a code file."""
    spec = modules.spec
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        **vision_tensors(modules, "vision_model."),
        **{f"mlp1.{n}": t.clone() for n, t in modules.mlp1.state_dict().items()},
        **qwen_tensors(modules.qwen, "language_model.", spec.lm_head_stored),
    }
    _save_sharded(tensors, folder, shards)
    config = chat_config(spec, modules.qwen)
    config.update(config_edit or {})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_tokenizer(folder, spec.vocab)
    code = "modeling_sailvl.py" if spec.vision_arch == "aimv2" else "modeling_internvl_chat.py"
    (folder / code).write_text("# InternVL-chat modelling code travels with the weights\n")
    return folder


def write_standalone(
    llm_dir: Optional[Path], vision_dir: Path, modules: Modules, transformers_names: bool = False
) -> None:
    """A Qwen2/Qwen3 folder (unless `llm_dir` is None) and an InternViT or AIMv2 folder, as released
    separately (for `sail-convert init`). AIMv2 comes under apple/ml-aim's names, or (`transformers_names`)
    saved by transformers' own `save_pretrained` (Aimv2VisionModel names and config, as the HF-native
    apple releases)."""
    spec = modules.spec
    vision_dir.mkdir(parents=True, exist_ok=True)
    if llm_dir is not None:
        llm_dir.mkdir(parents=True, exist_ok=True)
        _save_sharded(qwen_tensors(modules.qwen, "", spec.lm_head_stored), llm_dir, 1)
        (llm_dir / "config.json").write_text(json.dumps(llm_config(spec, modules.qwen), indent=2, sort_keys=True))
        write_tokenizer(llm_dir, spec.vocab)
    if transformers_names:
        modules.vit.save_pretrained(str(vision_dir))
        return
    _save_sharded(vision_tensors(modules, ""), vision_dir, 1)
    config = aimv2_config(spec) if spec.vision_arch == "aimv2" else internvit_config(spec)
    (vision_dir / "config.json").write_text(json.dumps(config, indent=2))


def internvl_pixel_shuffle(x: torch.Tensor, scale: float, ps_version: str) -> torch.Tensor:
    """InternVL's pixel_shuffle on [n, w, h, c], in its own view/permute form."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


@torch.no_grad()
def expected_logits(modules: Modules, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor]) -> torch.Tensor:
    """InternVL-chat's forward on the original transformers modules: logits [b, s, vocab]."""
    spec = modules.spec
    embeds = modules.qwen.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        out = modules.vit(pixel_values.to(spec.dtype), output_hidden_states=True)
        if spec.vision_arch == "aimv2":  # SAIL-VL: the encoder's output at -1, else a hidden state; no CLS
            vit = out.last_hidden_state if spec.select_layer == -1 else out.hidden_states[spec.select_layer]
            vit = vit.contiguous()  # transformers' output may be a strided view; InternVL's shuffle uses view()
        else:
            vit = out.hidden_states[spec.select_layer][:, 1:, :]
        g = int(vit.shape[1] ** 0.5)
        vit = internvl_pixel_shuffle(vit.reshape(vit.shape[0], g, g, -1), spec.downsample_ratio, spec.ps_version)
        vit = modules.mlp1(vit.reshape(vit.shape[0], -1, vit.shape[-1]))
        embeds = embeds.clone()
        mask = input_ids == IMG_CONTEXT_ID
        embeds[mask] = vit.reshape(-1, vit.shape[-1])
    return modules.qwen(inputs_embeds=embeds).logits


def sample_inputs(spec: Spec, tiles: int = 2, text: int = 6, seed: int = 3):
    """Token ids [1, s] with `tiles` image blocks of <IMG_CONTEXT> between text, and pixels [tiles, 3, S, S]."""
    gen = torch.Generator().manual_seed(seed)
    pieces = []
    for _ in range(tiles):
        pieces += [
            torch.randint(0, spec.vocab - 3, (text,), generator=gen),
            torch.full((spec.tokens_per_tile,), IMG_CONTEXT_ID),
        ]
    pieces.append(torch.randint(0, spec.vocab - 3, (text,), generator=gen))
    ids = torch.cat(pieces)[None]
    pixels = torch.randn(tiles, 3, spec.image_size, spec.image_size, generator=gen)
    return ids, pixels


def with_changes(spec: Spec, **changes) -> Spec:
    return replace(spec, **changes)


def edit_tensors(folder: Path, edit) -> None:
    """Rewrite a folder's safetensors through `edit(dict of tensors) -> dict` (index kept consistent)."""
    from safetensors.torch import load_file

    index_path = folder / "model.safetensors.index.json"
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    tensors, origin = {}, {}
    for fname in files:
        for n, t in load_file(str(folder / fname)).items():
            tensors[n], origin[n] = t, fname
    edited = edit(dict(tensors))
    for fname in files:
        part = {n: t.contiguous() for n, t in edited.items() if origin.get(n, files[0]) == fname}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
    if index_path.is_file():
        weight_map = {n: origin.get(n, files[0]) for n in edited}
        index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
