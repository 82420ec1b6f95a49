"""An InternVL-chat / SAIL-VL forward pass built from `transformers` parts: the third-party reference.

Vision, by family:
- InternViT: transformers' `InternVLVisionModel` (qk-norm off, qkv bias, LayerNorm, no mean pooling)
  loaded through the name mapping below; its `output_hidden_states` at `select_layer`, CLS dropped.
- AIMv2 / SAILViT: transformers' `Aimv2VisionModel` (no pooling head, learned positions, no biases)
  loaded from the ml-aim names through `mapping.aimv2_to_transformers`; SAIL-VL's features: the encoder's
  own `last_hidden_state` (after its final RMSNorm) when `select_layer` is -1, else `hidden_states[select_layer]`
  (before it); every patch is kept (no CLS).
Language: `Qwen2ForCausalLM`, `Qwen3ForCausalLM` or `Qwen3MoeForCausalLM` on the `language_model.` weights
(Qwen3-MoE's per-expert tensors `mlp.experts.E.{gate,up,down}_proj` go into the E-th slice of transformers 5's
fused `mlp.experts.gate_up_proj` [experts, 2 x ffn, hidden] (gate rows, then up) and `down_proj`; its experts
run the eager per-expert loop). The glue is written
here from InternVL's / SAIL-VL's description, independently of our model code: pixel shuffle (v1 leaves
the grid transposed), `mlp1`, write the vision tokens into the `<IMG_CONTEXT>` positions.
"""

import re
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from sail_megatron.config import ModelConfig
from sail_megatron.convert.hf_config import model_config_from_hf, read_json
from sail_megatron.convert.hf_io import SafetensorsFolder
from sail_megatron.convert.mapping import (
    LLM_PREFIX,
    PROJECTOR_PREFIX,
    VISION_PREFIX,
    aimv2_to_transformers,
    internvit_to_transformers,
)


def pixel_shuffle(features: torch.Tensor, downsample_ratio: float, ps_version: str) -> torch.Tensor:
    """[n, g*g, c] -> [n, (g/k)^2, c*k*k]: token (i, j) of the k-times smaller grid concatenates the
    k x k patches (i*k + a, j*k + b) in (a, b) order; v1 orders tokens column-major (InternVL's bug kept)."""
    n, patches, c = features.shape
    g = int(round(patches**0.5))
    k = int(round(1 / downsample_ratio))
    x = features.reshape(n, g // k, k, g // k, k, c)  # [n, i, a, j, b, c]
    order = (0, 1, 3, 2, 4, 5) if ps_version == "v2" else (0, 3, 1, 2, 4, 5)
    return x.permute(*order).reshape(n, (g // k) ** 2, k * k * c)


def _internvit_vision(v) -> nn.Module:
    from transformers.models.internvl import InternVLVisionConfig, InternVLVisionModel

    config = InternVLVisionConfig(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_attention_heads,
        intermediate_size=v.ffn_hidden_size,
        image_size=[v.image_size] * 2,
        patch_size=[v.patch_size] * 2,
        layer_norm_eps=v.layernorm_epsilon,
        use_qk_norm=False,
        attention_bias=True,
        norm_type="layer_norm",
        use_mean_pooling=False,
        use_absolute_position_embeddings=True,
        hidden_act="gelu",
    )
    config._attn_implementation = "eager"
    return InternVLVisionModel(config)


def _aimv2_vision(v) -> nn.Module:
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    config = Aimv2VisionConfig(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_attention_heads,
        intermediate_size=v.ffn_hidden_size,
        image_size=v.image_size,
        patch_size=v.patch_size,
        rms_norm_eps=v.layernorm_epsilon,
        qkv_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        use_head=False,
        is_native=False,
    )
    config._attn_implementation = "eager"
    return Aimv2VisionModel(config)


def _language(llm_config: Dict, arch: str) -> nn.Module:
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    classes = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}
    config_class, model_class = classes.get(arch, (Qwen2Config, Qwen2ForCausalLM))
    config = config_class(**{k: val for k, val in llm_config.items() if k != "auto_map"})
    config._attn_implementation = "eager"
    if arch == "qwen3_moe":
        config._experts_implementation = "eager"
    return model_class(config)


_EXPERT = re.compile(
    r"^(?P<experts>model\.layers\.\d+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$"
)


def _expert_slice(params: Dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """Where one Qwen3-MoE expert tensor (name without `language_model.`) lives in transformers 5's fused expert
    parameters: a view of `gate_up_proj[E]` (gate rows, then up) or `down_proj[E]`; None for other names."""
    m = _EXPERT.match(name)
    if m is None:
        return None
    e, experts = int(m["e"]), f"language.{m['experts']}"
    if m["proj"] == "down":
        return params[f"{experts}.down_proj"][e]
    rows = tensor.shape[0]
    fused = params[f"{experts}.gate_up_proj"][e]
    return fused[:rows] if m["proj"] == "gate" else fused[rows:]


class InternVLChatReference(nn.Module):
    """InternViT or AIMv2 + mlp1 + Qwen2, Qwen3 or Qwen3-MoE assembled from transformers modules; `forward`
    returns logits."""

    def __init__(self, hf_config: Dict, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg: ModelConfig = model_config_from_hf(hf_config)
        v, lang = self.cfg.vision, self.cfg.language
        self.vision = _aimv2_vision(v) if v.arch == "aimv2" else _internvit_vision(v)
        width = v.hidden_size * self.cfg.projector.merge_factor**2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(width, eps=self.cfg.projector.layernorm_epsilon),
            nn.Linear(width, lang.hidden_size),
            nn.GELU(),
            nn.Linear(lang.hidden_size, lang.hidden_size),
        )
        self.language = _language(hf_config["llm_config"], lang.arch)
        self.to(dtype).eval()

    @classmethod
    def from_folder(cls, hf_dir, dtype: torch.dtype = torch.float32) -> "InternVLChatReference":
        """The reference with the weights of an InternVL-chat folder (streamed, one tensor at a time)."""
        model = cls(read_json(Path(hf_dir) / "config.json"), dtype)
        with SafetensorsFolder(Path(hf_dir)) as folder:
            for name in folder.tensors:
                model.load_tensors({name: folder.read(name)})
        return model

    def load_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Copy InternVL-chat named tensors into the reference modules."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                if name.startswith(VISION_PREFIX):
                    to_transformers = (
                        aimv2_to_transformers if self.cfg.vision.arch == "aimv2" else internvit_to_transformers
                    )
                    targets = {f"vision.{k}": t for k, t in to_transformers(name[len(VISION_PREFIX) :], tensor).items()}
                elif name.startswith(PROJECTOR_PREFIX):
                    targets = {f"mlp1.{name[len(PROJECTOR_PREFIX) :]}": tensor}
                elif name.startswith(LLM_PREFIX):
                    expert = _expert_slice(params, name[len(LLM_PREFIX) :], tensor)
                    if expert is not None:
                        expert.copy_(tensor)
                        continue
                    targets = {f"language.{name[len(LLM_PREFIX) :]}": tensor}
                else:
                    raise KeyError(f"{name} is not an InternVL-chat tensor name")
                for target, t in targets.items():
                    if target == "language.lm_head.weight" and self.cfg.language.tie_word_embeddings:
                        continue  # tied: the embedding is the head
                    params[target].copy_(t)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [T, 3, S, S] -> language-space tokens [T, tokens_per_tile, hidden]."""
        v = self.cfg.vision
        out = self.vision(pixel_values=pixel_values.to(self.mlp1[0].weight.dtype), output_hidden_states=True)
        if v.arch == "aimv2":  # SAIL-VL: the encoder's own (normed) output at -1, else a raw hidden state
            hidden = out.last_hidden_state if v.select_layer == -1 else out.hidden_states[v.select_layer]
        else:
            hidden = out.hidden_states[v.select_layer][:, 1:]  # drop CLS
        shuffled = pixel_shuffle(hidden, self.cfg.projector.downsample_ratio, self.cfg.projector.ps_version)
        return self.mlp1(shuffled)

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None, image_token_id: Optional[int] = None
    ) -> torch.Tensor:
        """input_ids [b, s] -> logits [b, s, vocab]."""
        embeds = self.language.get_input_embeddings()(input_ids)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            vision = self.vision_features(pixel_values).reshape(-1, embeds.shape[-1])
            mask = input_ids == image_token_id
            if int(mask.sum()) != vision.shape[0]:
                raise ValueError(f"{int(mask.sum())} image tokens but {vision.shape[0]} vision tokens")
            embeds = embeds.clone()
            embeds[mask] = vision.to(embeds.dtype)
        return self.language(inputs_embeds=embeds).logits
