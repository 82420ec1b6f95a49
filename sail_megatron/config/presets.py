"""Named model presets with the real dimensions of the SAIL-VL family (and a tiny one for the CPU).

Their parameter counts: `python -m sail_megatron.model.presets`.
"""

from dataclasses import replace

from sail_megatron.config.model import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig

INTERNVIT_300M = VisionConfig()  # InternViT-300M-448px
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

PRESETS = {
    # Runs a training step on the CPU in seconds; same architecture, toy widths, 112px tiles (16 tokens each).
    "tiny": ModelConfig(
        vision=VisionConfig(
            hidden_size=64,
            num_layers=3,
            num_attention_heads=4,
            ffn_hidden_size=128,
            image_size=112,
            patch_size=14,
            select_layer=-1,
        ),
        projector=ProjectorConfig(),
        language=LanguageConfig(
            hidden_size=64,
            num_layers=4,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=160,
            vocab_size=512,
            max_position_embeddings=4096,
            make_vocab_size_divisible_by=64,
        ),
    ),
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
