"""The megatron-core configs each model part gets on a GPU (built here without one: configs are plain data)."""

import pytest

from sail_megatron.config import ParallelConfig, PrecisionConfig
from sail_megatron.model.presets import get_preset
from sail_megatron.model.transformer_configs import build_part_configs
from sail_megatron.platform.backends import Backends

# A GPU without Transformer Engine: enough for every fusion flag these configs decide (RoPE fusion
# would ask for an installed TE).
GPU = Backends(cuda=True, transformer_engine=False, apex=False)


def _parts(backends, preset="sail-vl-2b"):
    return build_part_configs(get_preset(preset), ParallelConfig(), PrecisionConfig(dtype="bf16"), backends)


@pytest.mark.parametrize("preset", ["tiny", "sail-vl-2b", "sail-vl-8b"])
def test_vision_side_uses_exact_gelu_on_gpu(preset):
    # Megatron's fused bias-GELU is the tanh approximation; InternViT and mlp1 use the exact erf form.
    parts = _parts(GPU, preset)
    assert not parts.vision.bias_activation_fusion
    assert not parts.projector.bias_activation_fusion
    assert parts.language.bias_activation_fusion  # fused SwiGLU is exact


def test_grad_accumulation_fusion_needs_apex_extension(monkeypatch):
    # Transformer Engine or not, nothing makes megatron's own ColumnParallelLinear (the output layer, local
    # layers) accept gradient-accumulation fusion: it needs apex's fused_weight_gradient_mlp_cuda.
    monkeypatch.setattr("sail_megatron.model.transformer_configs._grad_accum_fusion_available", False)
    parts = _parts(GPU)
    assert not any(p.gradient_accumulation_fusion for p in (parts.vision, parts.projector, parts.language))
    monkeypatch.setattr("sail_megatron.model.transformer_configs._grad_accum_fusion_available", True)
    assert _parts(GPU).language.gradient_accumulation_fusion


def test_te_vision_keeps_its_own_wgrad_fusion_without_apex(monkeypatch):
    # The vision side is all TE linears under TE layers: TE fuses wgrad accumulation itself.
    monkeypatch.setattr("sail_megatron.model.transformer_configs._grad_accum_fusion_available", False)
    # TE is not installed here: megatron's config check of the LM's RoPE fusion only asks that TE's kernel exist.
    monkeypatch.setattr("megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb", object())
    te = Backends(cuda=True, transformer_engine=True, apex=False)
    parts = _parts(te)
    assert parts.vision.gradient_accumulation_fusion and parts.projector.gradient_accumulation_fusion
    assert not parts.language.gradient_accumulation_fusion  # its output layer is megatron's own linear
    local = build_part_configs(
        get_preset("sail-vl-2b"), ParallelConfig(), PrecisionConfig(dtype="bf16", layers="local"), te
    )
    assert not local.vision.gradient_accumulation_fusion


def test_cpu_takes_no_fusions():
    parts = _parts(Backends(cuda=False, transformer_engine=False, apex=False))
    for p in (parts.vision, parts.projector, parts.language):
        assert not p.bias_activation_fusion and not p.gradient_accumulation_fusion
