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


def test_moe_language_config_routes_as_qwen3_moe():
    cpu = Backends(cuda=False, transformer_engine=False, apex=False)
    parallel = ParallelConfig(expert_model_parallel_size=2)
    parts = build_part_configs(get_preset("tiny-sail-vl2-moe"), parallel, PrecisionConfig(dtype="fp32"), cpu)
    lang = parts.language
    assert (lang.num_moe_experts, lang.moe_router_topk, lang.moe_ffn_hidden_size) == (4, 2, 48)
    # softmax over all experts, top k, renormalized: megatron's softmax over the top-k logits
    assert lang.moe_router_score_function == "softmax" and lang.moe_router_pre_softmax is False
    assert lang.moe_router_load_balancing_type == "aux_loss" and lang.moe_aux_loss_coeff == 0.001
    assert lang.moe_expert_capacity_factor is None  # dropless
    assert lang.moe_token_dispatcher_type == "alltoall" and lang.calculate_per_token_loss
    assert lang.expert_model_parallel_size == 2 and lang.expert_tensor_parallel_size == 1
    assert not lang.moe_grouped_gemm and not lang.moe_permute_fusion  # local experts (SequentialMLP)
    # The vision side has no experts (megatron refuses EP > 1 without them).
    assert parts.vision.num_moe_experts is None and parts.vision.expert_model_parallel_size == 1
    dense = build_part_configs(get_preset("tiny-sail-vl2"), ParallelConfig(), PrecisionConfig(dtype="fp32"), cpu)
    assert dense.language.num_moe_experts is None


def test_moe_without_renormalization_or_aux_loss():
    from dataclasses import replace

    cfg = get_preset("tiny-sail-vl2-moe")
    cfg.language = replace(cfg.language, moe_norm_topk_prob=False, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=1e-3)
    cpu = Backends(cuda=False, transformer_engine=False, apex=False)
    lang = build_part_configs(cfg, ParallelConfig(), PrecisionConfig(dtype="fp32"), cpu).language
    assert lang.moe_router_pre_softmax is True  # the full softmax's values at the chosen experts
    assert lang.moe_router_load_balancing_type == "none" and lang.moe_z_loss_coeff == 1e-3


def test_moe_takes_grouped_gemm_with_te_layers(monkeypatch):
    monkeypatch.setattr("megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb", object())
    import megatron.core.transformer.moe.moe_utils as moe_utils

    for name in ("fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index"):
        monkeypatch.setattr(moe_utils, name, object(), raising=False)
    for name in ("fused_sort_chunks_by_index_with_probs", "fused_unpermute"):
        monkeypatch.setattr(moe_utils, name, object(), raising=False)
    te = Backends(cuda=True, transformer_engine=True, apex=False)
    lang = build_part_configs(get_preset("tiny-sail-vl2-moe"), ParallelConfig(), PrecisionConfig(dtype="bf16"), te)
    assert lang.language.moe_grouped_gemm and lang.language.moe_permute_fusion


def test_moe_layer_spec_keeps_the_pre_mlp_norm_under_its_own_name():
    """TE's MoE layer keeps the pre-MLP norm standalone (`pre_mlp_layernorm.weight`: no fc1 to fuse it into);
    the local spec must not rename it to the fused `mlp.linear_fc1.layer_norm_weight` as it does for dense."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from sail_megatron.model.specs import language_layer_spec

    moe = language_layer_spec("local", get_preset("tiny-sail-vl2-moe").language).submodules
    assert moe.mlp.module is MoELayer and moe.mlp.submodules.experts.module is SequentialMLP
    assert moe.sharded_state_dict_keys_map == {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    dense = language_layer_spec("local", get_preset("tiny-sail-vl2").language).submodules
    assert "pre_mlp_layernorm." in dense.sharded_state_dict_keys_map
