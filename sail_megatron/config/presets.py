"""Named model presets with the real dimensions of the SAIL-VL family (and tiny ones for the CPU).

Their parameter counts: `python -m sail_megatron.model.presets`.
"""

from dataclasses import replace

from sail_megatron.config.model import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig

INTERNVIT_300M = VisionConfig()  # InternViT-300M-448px
# AIMv2 448px encoders; SAILViT-Huge/Large are these architectures further trained by the SAIL team.
AIMV2_HUGE = VisionConfig(
    arch="aimv2",
    hidden_size=1536,
    num_layers=24,
    num_attention_heads=12,
    ffn_hidden_size=4096,
    layernorm_epsilon=1e-5,
    select_layer=-1,
)
AIMV2_LARGE = replace(AIMV2_HUGE, hidden_size=1024, num_attention_heads=8, ffn_hidden_size=2816)

QWEN25_15B = LanguageConfig()  # Qwen2.5-1.5B as SAIL-VL-2B uses it (untied lm_head)
QWEN25_7B = LanguageConfig(
    hidden_size=3584,
    num_layers=28,
    num_attention_heads=28,
    num_query_groups=4,
    ffn_hidden_size=18944,
    vocab_size=152064,
    tie_word_embeddings=False,
)
QWEN3_17B = LanguageConfig(
    arch="qwen3",
    hidden_size=2048,
    num_layers=28,
    num_attention_heads=16,
    num_query_groups=8,
    ffn_hidden_size=6144,
    vocab_size=151936,
    head_dim=128,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
)
QWEN3_8B = replace(
    QWEN3_17B,
    hidden_size=4096,
    num_layers=36,
    num_attention_heads=32,
    ffn_hidden_size=12288,
    tie_word_embeddings=False,
)
# Qwen3-30B-A3B (SAIL-VL2's MoE model): every layer routes each token to 8 of 128 SwiGLU experts of width 768
# (softmax over all experts, top 8 renormalized), no shared expert; `intermediate_size` 6144 is in its config
# but no layer is dense. 30,532,122,624 parameters, about 3.3B active per token.
QWEN3_30B_A3B = replace(
    QWEN3_17B,
    arch="qwen3_moe",
    hidden_size=2048,
    num_layers=48,
    num_attention_heads=32,
    num_query_groups=4,
    ffn_hidden_size=6144,
    tie_word_embeddings=False,
    num_experts=128,
    moe_ffn_hidden_size=768,
    moe_router_topk=8,
    moe_norm_topk_prob=True,
    moe_aux_loss_coeff=0.001,
)

VISION_PRESETS = {
    "internvit-300m": INTERNVIT_300M,
    "sailvit-huge": AIMV2_HUGE,
    "sailvit-large": AIMV2_LARGE,
}
"""Vision encoders alone, as released (all layers, select_layer -1)."""

# The tiny models: same architectures, toy widths, 112px tiles (16 tokens each); a training step on
# the CPU takes seconds.
_TINY_PROJECTOR = ProjectorConfig()
_TINY_INTERNVIT = VisionConfig(
    hidden_size=64, num_layers=3, num_attention_heads=4, ffn_hidden_size=128, image_size=112, patch_size=14
)
_TINY_AIMV2 = replace(_TINY_INTERNVIT, arch="aimv2", layernorm_epsilon=1e-5)
_TINY_QWEN2 = LanguageConfig(
    hidden_size=64,
    num_layers=4,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=160,
    vocab_size=512,
    max_position_embeddings=4096,
    make_vocab_size_divisible_by=64,
)
# head_dim 32 x 4 heads is wider than hidden 64, as in Qwen3-0.6B: exercises an explicit head_dim.
_TINY_QWEN3 = replace(_TINY_QWEN2, arch="qwen3", head_dim=32, tie_word_embeddings=True)
# Qwen3-MoE in miniature: 4 experts of width 48, top 2 (EP 2 and 4 split them), untied as Qwen3-30B-A3B.
_TINY_QWEN3_MOE = replace(
    _TINY_QWEN3,
    arch="qwen3_moe",
    tie_word_embeddings=False,
    num_experts=4,
    moe_ffn_hidden_size=48,
    moe_router_topk=2,
    moe_norm_topk_prob=True,
    moe_aux_loss_coeff=0.001,
)

PRESETS = {
    "tiny": ModelConfig(vision=_TINY_INTERNVIT, projector=_TINY_PROJECTOR, language=_TINY_QWEN2),
    # SAIL-VL-1.5/1.6 layout (AIMv2 + Qwen2.5) and SAIL-VL2 layout (AIMv2 + Qwen3), tiny.
    "tiny-aimv2": ModelConfig(vision=_TINY_AIMV2, projector=_TINY_PROJECTOR, language=_TINY_QWEN2),
    "tiny-sail-vl2": ModelConfig(vision=_TINY_AIMV2, projector=_TINY_PROJECTOR, language=_TINY_QWEN3),
    "tiny-sail-vl2-moe": ModelConfig(vision=_TINY_AIMV2, projector=_TINY_PROJECTOR, language=_TINY_QWEN3_MOE),
    "sail-vl-2b": ModelConfig(
        vision=replace(INTERNVIT_300M, select_layer=-4, drop_path_rate=0.1),
        projector=ProjectorConfig(),
        language=QWEN25_15B,
    ),
    "sail-vl-8b": ModelConfig(
        vision=replace(INTERNVIT_300M, select_layer=-4, drop_path_rate=0.1),
        projector=ProjectorConfig(),
        language=QWEN25_7B,
    ),
    "sail-vl-1.5-2b": ModelConfig(vision=AIMV2_HUGE, projector=ProjectorConfig(), language=QWEN25_15B),
    "sail-vl-1.6-8b": ModelConfig(vision=AIMV2_HUGE, projector=ProjectorConfig(), language=QWEN25_7B),
    "sail-vl2-2b": ModelConfig(vision=AIMV2_HUGE, projector=ProjectorConfig(), language=QWEN3_17B),
    "sail-vl2-8b": ModelConfig(vision=AIMV2_HUGE, projector=ProjectorConfig(), language=QWEN3_8B),
    # SAIL-VL2's mixture-of-experts model (the paper's 31.1B, ~3B active): SAILViT-Huge + Qwen3-30B-A3B.
    "sail-vl2-moe": ModelConfig(vision=AIMV2_HUGE, projector=ProjectorConfig(), language=QWEN3_30B_A3B),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a preset (callers may modify it)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    p = PRESETS[name]
    return ModelConfig(
        vision=replace(p.vision),
        projector=replace(p.projector),
        language=replace(p.language),
        image_context_token_id=p.image_context_token_id,
    )
