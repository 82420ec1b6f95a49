"""Named model presets with the real dimensions, and their parameter counts.

`python -m sail_megatron.model.presets` prints each preset's parameters by part without
allocating any weight.
"""

import argparse
from dataclasses import replace

from sail_megatron.config import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig
from sail_megatron.model.param_count import count_parameters

INTERNVIT_300M = VisionConfig()  # InternViT-300M-448px
QWEN25_15B = LanguageConfig()  # Qwen2.5-1.5B as SAIL-VL-2B uses it (untied lm_head)
QWEN25_7B = LanguageConfig(hidden_size=3584, num_layers=28, num_attention_heads=28, num_query_groups=4,
                           ffn_hidden_size=18944, vocab_size=152064, tie_word_embeddings=False)

PRESETS = {
    # Runs a training step on the CPU in seconds; same architecture, toy widths, 112px tiles (16 tokens each).
    "tiny": ModelConfig(
        vision=VisionConfig(hidden_size=64, num_layers=3, num_attention_heads=4, ffn_hidden_size=128,
                            image_size=112, patch_size=14, select_layer=-1),
        projector=ProjectorConfig(),
        language=LanguageConfig(hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2,
                                ffn_hidden_size=160, vocab_size=512, max_position_embeddings=4096,
                                make_vocab_size_divisible_by=64),
    ),
    "sail-vl-2b": ModelConfig(vision=replace(INTERNVIT_300M, select_layer=-4, drop_path_rate=0.1),
                              projector=ProjectorConfig(), language=QWEN25_15B),
    "sail-vl-8b": ModelConfig(vision=replace(INTERNVIT_300M, select_layer=-4, drop_path_rate=0.1),
                              projector=ProjectorConfig(), language=QWEN25_7B),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a preset (callers may modify it)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    p = PRESETS[name]
    return ModelConfig(vision=replace(p.vision), projector=replace(p.projector), language=replace(p.language),
                       image_context_token_id=p.image_context_token_id)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(PRESETS), help="presets to count (default: all)")
    args = parser.parse_args(argv)
    header = f"{'preset':<12}{'vision built':>16}{'vision ckpt':>16}{'projector':>14}{'language':>16}{'total built':>16}{'total ckpt':>16}"
    print(header)
    for name in args.names:
        c = count_parameters(get_preset(name))
        print(f"{name:<12}{c.vision_built:>16,}{c.vision_checkpoint:>16,}{c.projector:>14,}{c.language:>16,}"
              f"{c.total_built:>16,}{c.total_checkpoint:>16,}")
    print("vision built: layers up to select_layer; ckpt: all layers, as the released checkpoint stores them")


if __name__ == "__main__":
    main()
