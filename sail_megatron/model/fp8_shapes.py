"""Shape rules of Transformer Engine's FP8 linear layers that the model has to meet."""

import math

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def fp8_token_multiple(fp8_recipe: str) -> int:
    """TE runs an FP8 GEMM only when the product of the input's leading dims (tokens) divides by this
    (TE's `assert_dim_for_fp8_exec`); MXFP8 scales blocks of 32."""
    return 32 if fp8_recipe == "mxfp8" else 8


def fp8_tile_multiple(config: TransformerConfig, tokens_per_tile: int) -> int:
    """How many ViT tiles must run together so that tiles x tokens_per_tile meets the FP8 rule
    (1 without FP8). InternViT's 1025 tokens per tile are odd, so the tile count itself must be
    padded; tiles are independent, so padding with blank tiles leaves the real tiles' output exact."""
    if not config.fp8:
        return 1
    multiple = fp8_token_multiple(config.fp8_recipe)
    return multiple // math.gcd(multiple, tokens_per_tile)


def pad_to_tile_multiple(pixel_values: torch.Tensor, multiple: int) -> torch.Tensor:
    """Tiles [T, 3, S, S] followed by blank tiles up to a multiple of `multiple` (fp8_tile_multiple); the
    encoder drops the blank ones' output again (its first T tiles)."""
    blank = -pixel_values.shape[0] % multiple
    if not blank:
        return pixel_values
    return torch.cat([pixel_values, pixel_values.new_zeros(blank, *pixel_values.shape[1:])])
