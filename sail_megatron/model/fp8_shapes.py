"""Shape rules of Transformer Engine's FP8 GEMMs that the model has to meet.

Hopper runs FP8 GEMMs only in the TN layout, so the weight-gradient GEMM of a linear layer reads the
transposed FP8 copy of its input, whose leading dimension is the token count; cuBLASLt needs it to be a
multiple of 16 (TE: "Leading dimension requirement on A for FP8 GEMM. Caller must pad."). The forward's
own check (tokens % 8) is weaker. MXFP8 scales blocks of 32. So every GEMM that runs in FP8 (forward,
data gradient, weight gradient) gets a token count that divides by `fp8_token_multiple`.
"""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def fp8_token_multiple(fp8_recipe: str) -> int:
    """Tokens (product of an FP8 linear's leading input dims) must divide by this."""
    return 32 if fp8_recipe == "mxfp8" else 16


def token_multiple(config: TransformerConfig) -> int:
    """What a part's token count must divide by under its config: 1 without FP8."""
    return fp8_token_multiple(config.fp8_recipe) if config.fp8 else 1


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """x [n, ...] followed by zero rows up to a multiple of `multiple` rows (callers drop them again)."""
    extra = -x.shape[0] % multiple
    return torch.cat([x, x.new_zeros(extra, *x.shape[1:])]) if extra else x
