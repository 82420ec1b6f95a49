"""Our typed configs -> megatron-core TransformerConfigs, one per model part.

Backend-dependent switches (fusions, CPU initialization, FP8) are decided here from the detected
backends, so the model code never branches on them.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import _grad_accum_fusion_available
from megatron.core.transformer.transformer_config import TransformerConfig

from sail_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig
from sail_megatron.platform.backends import Backends


@dataclass(frozen=True)
class PartConfigs:
    vision: TransformerConfig
    projector: TransformerConfig
    language: TransformerConfig


def _common(parallel: ParallelConfig, precision: PrecisionConfig, backends: Backends) -> dict:
    dtype = precision.torch_dtype
    gpu = backends.cuda
    return dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        init_method_std=0.02,
        # CPU runs initialise on the host; GPU runs initialise in place on the device.
        use_cpu_initialization=not gpu,
        # Fused kernels exist only on GPUs (and some only with apex/TE); the CPU takes the plain ops.
        bias_activation_fusion=gpu,
        bias_dropout_fusion=gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=gpu and backends.transformer_engine,
        # megatron's own ColumnParallelLinear (the output layer, local layers) refuses this flag unless
        # apex's fused_weight_gradient_mlp_cuda extension imports; ask megatron's own test for it.
        gradient_accumulation_fusion=gpu and _grad_accum_fusion_available,
        persist_layer_norm=gpu and backends.apex,
        cuda_graph_scope=[],  # megatron-core 0.16 default "full" is deprecated (same meaning)
    )


def _fp8(precision: PrecisionConfig, enabled: bool) -> dict:
    if precision.fp8 is None or not enabled:
        return {}
    return dict(
        fp8=precision.fp8,
        fp8_recipe=precision.fp8_recipe,
        fp8_amax_history_len=precision.fp8_amax_history_len,
        fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
    )


def _recompute_language(parallel: ParallelConfig) -> dict:
    if parallel.recompute_granularity is None:
        return {}
    if parallel.recompute_granularity == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return dict(
        recompute_granularity="full",
        recompute_method=parallel.recompute_method,
        recompute_num_layers=parallel.recompute_num_layers,
    )


def _recompute_vision(parallel: ParallelConfig) -> dict:
    if not parallel.recompute_vision:
        return {}
    return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def _moe_language(model: ModelConfig, parallel: ParallelConfig, te_layers: bool, gpu: bool) -> dict:
    """Mixture-of-experts fields of the language config (none for a dense decoder).

    Routing as Qwen3-MoE's `Qwen3MoeTopKRouter`: softmax over all experts' logits, the top k, renormalized to
    sum to one when `norm_topk_prob` (megatron's softmax over the top-k logits, `moe_router_pre_softmax`
    False: the same numbers), else the full softmax's values (`pre_softmax` True). Dropless: no capacity
    factor, every token reaches its k experts, so a sample's routing does not depend on what else is in the
    micro-batch (packing invariance). Experts: megatron's SequentialMLP of local linears on the CPU / local
    layers, TE's grouped GEMM (TEGroupedMLP) with Transformer Engine layers; both write the same checkpoint
    keys (`mlp.experts.experts.linear_fc{1,2}.weight`, one slice per expert)."""
    lang = model.language
    if not lang.is_moe:
        return {}
    return dict(
        num_moe_experts=lang.num_experts,
        moe_ffn_hidden_size=lang.moe_ffn_hidden_size,
        moe_router_topk=lang.moe_router_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not lang.moe_norm_topk_prob,
        moe_router_dtype="fp32",  # router GEMM and softmax in fp32 under bf16 training
        moe_router_load_balancing_type="aux_loss" if lang.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=lang.moe_aux_loss_coeff,
        moe_z_loss_coeff=lang.moe_z_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=te_layers and gpu,
        moe_permute_fusion=te_layers and gpu,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )


def build_part_configs(
    model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, backends: Backends
) -> PartConfigs:
    common = _common(parallel, precision, backends)
    v, lang = model.vision, model.language
    # The ViT lives whole on stage 0. InternViT and `mlp1` use exact (erf) GELU; megatron's fused
    # bias-GELU is the tanh approximation, so GELU parts never take it (its fused SwiGLU is exact).
    vision_common = {
        **common,
        "pipeline_model_parallel_size": 1,
        "tensor_model_parallel_size": parallel.vision_tensor_parallel_size,
        "bias_activation_fusion": False,
    }
    # TE's linears accumulate weight gradients into DDP's fp32 main_grad by themselves (no apex needed);
    # only megatron's own linears (the LM's output layer, local layers) need apex's extension for it. The
    # vision side is all TE linears when TE layers are chosen.
    te_layers = precision.layer_backend(backends) == "te"
    vision_common["gradient_accumulation_fusion"] = common["gradient_accumulation_fusion"] or (
        backends.cuda and te_layers
    )
    arch = v.spec
    vision_fusion = {
        "bias_activation_fusion": common["bias_activation_fusion"] and arch.gated_mlp,
        # A graphed ViT (model/vision_graphs.py) hands its weight gradients to autograd: fused accumulation
        # into main_grad would run inside the graph and in the warm-up passes before its capture.
        "gradient_accumulation_fusion": vision_common["gradient_accumulation_fusion"]
        and not precision.vision_cuda_graphs,
    }
    vision = TransformerConfig(
        num_layers=v.num_built_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        normalization=arch.normalization,
        layernorm_epsilon=v.layernorm_epsilon,
        add_bias_linear=arch.bias,
        add_qkv_bias=arch.bias,
        gated_linear_unit=arch.gated_mlp,
        activation_func=F.silu if arch.gated_mlp else F.gelu,
        sequence_parallel=False,
        **{**vision_common, **vision_fusion},
        **_fp8(precision, precision.fp8_vision),
        **_recompute_vision(parallel),
    )
    projector = TransformerConfig(
        # The projector has no attention; megatron-core only asks that the head count divide by TP.
        num_layers=1,
        hidden_size=lang.hidden_size,
        ffn_hidden_size=lang.hidden_size,
        num_attention_heads=parallel.vision_tensor_parallel_size,
        normalization="LayerNorm",
        layernorm_epsilon=model.projector.layernorm_epsilon,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,
        sequence_parallel=False,
        **vision_common,
        **_fp8(precision, precision.fp8_vision),
    )
    language = TransformerConfig(
        num_layers=lang.num_layers,
        hidden_size=lang.hidden_size,
        num_attention_heads=lang.num_attention_heads,
        num_query_groups=lang.num_query_groups,
        ffn_hidden_size=lang.ffn_hidden_size,
        kv_channels=lang.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=lang.norm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=lang.spec.qkv_bias,
        qk_layernorm=lang.spec.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        sequence_parallel=parallel.sequence_parallel,
        calculate_per_token_loss=True,
        **common,
        **_fp8(precision, True),
        **_recompute_language(parallel),
        **_moe_language(model, parallel, te_layers, backends.cuda),
    )
    return PartConfigs(vision=vision, projector=projector, language=language)
