"""Every layer spec of the model, in one place.

This module is the one swap point between backends: Transformer Engine layers (fused LayerNorm+linear,
TE attention, FP8) when TE and CUDA are present, megatron-core's local layers otherwise. Model code
only builds what a spec names.
"""

from dataclasses import dataclass

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from sail_megatron.config import LanguageConfig, ModelConfig, VisionConfig
from sail_megatron.model.aimv2 import AIMv2Model
from sail_megatron.model.internvit import InternViTModel
from sail_megatron.model.packed_attention import PackedDotProductAttention
from sail_megatron.model.vision_layer import LayerScaleTransformerLayer


@dataclass(frozen=True)
class ModelSpecs:
    """The module and layer specs one SAIL-VL model is built from."""

    backend: str
    vision_encoder: ModuleSpec
    """The encoder module with its layer (and norm) specs as params; built with (config, vision)."""
    projector_norm: ModuleSpec
    projector_mlp: MLPSubmodules
    language_block: TransformerBlockSubmodules
    """This pipeline stage's decoder layers and, named here rather than left to megatron, the final norm."""


class LocalLayers(LocalSpecProvider):
    """megatron-core's local layers with torch's norms on every machine. megatron's own provider returns
    apex's FusedLayerNorm (CUDA-only) for LayerNorm when apex imports, until its first RMSNorm request
    rebinds a module global: the module tree would depend on the machine and on the build order."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return WrappedTorchNorm

    def core_attention(self) -> type:
        """megatron's local attention plus packed (THD) sequences, which only TE's attention takes."""
        return PackedDotProductAttention


def _provider(backend: str) -> BackendSpecProvider:
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    if backend == "local":
        return LocalLayers()
    raise ValueError(f"unknown layer backend {backend!r}: use 'te' or 'local'")


def _mlp(provider: BackendSpecProvider) -> MLPSubmodules:
    """fc1 with the pre-norm folded in where the backend can fuse it."""
    fc1 = provider.column_parallel_layer_norm_linear() if provider.fuse_layernorm_and_linear() else None
    return MLPSubmodules(linear_fc1=fc1 or provider.column_parallel_linear(), linear_fc2=provider.row_parallel_linear())


# Checkpoint names of separate pre-norms under the names TE's fused LayerNorm+linear gives them, so a
# checkpoint written with local layers (CPU, conversion) loads into TE layers and back (as megatron-core's
# local GPT spec does for the language model).
TE_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def vision_layer_spec(provider: BackendSpecProvider, vision: VisionConfig) -> ModuleSpec:
    """Bidirectional pre-norm ViT layer: with layer scale and drop path for InternViT, megatron-core's
    plain layer for AIMv2 (norm type, biases and gated MLP follow from the TransformerConfig)."""
    arch = vision.spec
    fused = provider.fuse_layernorm_and_linear()
    norm = IdentityOp if fused else provider.layer_norm(rms_norm=arch.normalization == "RMSNorm")
    qkv = provider.column_parallel_layer_norm_linear() if fused else provider.column_parallel_linear()
    return ModuleSpec(
        module=LayerScaleTransformerLayer if arch.layer_scale else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=provider.core_attention(),
                    linear_proj=provider.row_parallel_linear(),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=_mlp(provider)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused else TE_NORM_KEYS,
        ),
    )


def vision_encoder_spec(provider: BackendSpecProvider, vision: VisionConfig) -> ModuleSpec:
    """The encoder family's module, given its layer spec (and, for AIMv2, its standalone norms)."""
    layer = vision_layer_spec(provider, vision)
    if vision.arch == "aimv2":
        return ModuleSpec(
            module=AIMv2Model, params={"layer_spec": layer, "norm_spec": provider.layer_norm(rms_norm=True)}
        )
    return ModuleSpec(module=InternViTModel, params={"layer_spec": layer})


def language_layer_spec(backend: str, language: LanguageConfig) -> ModuleSpec:
    """Qwen decoder layer: RMSNorm, GQA (qkv bias on Qwen2, per-head q/k RMSNorm on Qwen3), SwiGLU, or
    megatron-core's MoELayer for mixture-of-experts families (router, token dispatcher, experts: TE's
    grouped GEMM under `te`, a SequentialMLP of local linears under `local`); packed (THD) attention
    either way: TE's attention takes THD natively, the local spec gets our packed core attention."""
    qk_layernorm = language.spec.qk_layernorm
    moe = dict(num_experts=language.num_experts, moe_grouped_gemm=backend == "te") if language.is_moe else {}
    if backend == "te":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm, **moe)
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm", **moe)
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    if language.is_moe:
        # TE keeps an MoE layer's pre-MLP norm standalone (`pre_mlp_layernorm.weight`: no fc1 to fold it
        # into), so the local layer keeps that name too; only the input norm takes TE's fused name.
        keys = spec.submodules.sharded_state_dict_keys_map
        spec.submodules.sharded_state_dict_keys_map = {k: v for k, v in keys.items() if k != "pre_mlp_layernorm."}
    return spec


def language_block_spec(backend: str, language: LanguageConfig, num_layers: int) -> TransformerBlockSubmodules:
    """`num_layers` decoder layers and the final RMSNorm of the chosen backend. Given only a layer spec,
    megatron picks the final norm itself: TE's whenever Transformer Engine imports, whatever the backend,
    so a local-layer model would hold a TE module (CUDA-only, with a checkpoint key the local one lacks)."""
    return TransformerBlockSubmodules(
        layer_specs=[language_layer_spec(backend, language)] * num_layers,
        layer_norm=_provider(backend).layer_norm(rms_norm=True),
    )


def build_specs(backend: str, model: ModelConfig, language_layers: int) -> ModelSpecs:
    """The specs of a model whose pipeline stage holds `language_layers` decoder layers."""
    provider = _provider(backend)
    fused = provider.fuse_layernorm_and_linear()
    return ModelSpecs(
        backend=backend,
        vision_encoder=vision_encoder_spec(provider, model.vision),
        # TE folds the projector's LayerNorm into fc1 (TELayerNormColumnParallelLinear).
        projector_norm=IdentityOp if fused else provider.layer_norm(rms_norm=False),
        projector_mlp=_mlp(provider),
        language_block=language_block_spec(backend, model.language, language_layers),
    )
