"""How the ViT lays out the tiles of a micro-batch for its transformer layers.

Tiles are independent sequences of `tokens_per_tile` tokens. The ViT runs them as a batch, [s, T, h],
when every tile count meets the GEMM token rule (fp8_shapes): always without FP8, and for AIMv2's 1024
tokens under FP8. InternViT's 1025 tokens (patches + CLS) are odd, so under FP8 a batch of T tiles would
need T padded to a multiple of 16 blank tiles; instead the tiles run packed, [T*s + pad, 1, h] in THD
form, one attention segment per tile and the pad (fewer than 16 tokens, 32 for MXFP8) as a segment of
its own, so no real token attends to it. Padding per micro-batch: under 16 tokens instead of up to 15
tiles.
"""

import functools

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from sail_megatron.model.fp8_shapes import pad_rows


@functools.lru_cache(maxsize=64)
def _tile_bounds(tiles: int, tokens_per_tile: int, pad: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of `tiles` equal segments then a pad segment. Cached: building it anew copies from
    pageable host memory, which blocks the host until the device is idle."""
    bounds = [i * tokens_per_tile for i in range(tiles + 1)] + ([tiles * tokens_per_tile + pad] if pad else [])
    return torch.tensor(bounds, dtype=torch.int32, device=device)


class TileLayout:
    def __init__(self, tokens_per_tile: int, token_multiple: int):
        self.tokens_per_tile = tokens_per_tile
        self.token_multiple = token_multiple
        self.packed = tokens_per_tile % token_multiple != 0
        """Decided once per model: batched when any tile count meets the rule, else packed."""

    def pad_tokens(self, tiles: int) -> int:
        """Pad tokens the packed form adds to `tiles` tiles (0 when batched)."""
        return -tiles * self.tokens_per_tile % self.token_multiple if self.packed else 0

    def tokens(self, tiles: int) -> int:
        """Tokens every ViT GEMM sees for `tiles` tiles."""
        return tiles * self.tokens_per_tile + self.pad_tokens(tiles)

    def enter(self, x: torch.Tensor):
        """[T, s, h] -> (hidden states for megatron's layers, PackedSeqParams or None)."""
        if not self.packed:
            return x.transpose(0, 1).contiguous(), None  # [s, b=T, h]: megatron's layout
        tiles, s, h = x.shape
        pad = self.pad_tokens(tiles)
        flat = pad_rows(x.reshape(tiles * s, h), self.token_multiple)
        cu = _tile_bounds(tiles, s, pad, x.device)
        longest = max(s, pad)
        params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
        )
        return flat.unsqueeze(1), params  # [t, 1, h]

    def leave(self, x: torch.Tensor, tiles: int) -> torch.Tensor:
        """The layers' output back to [T, s, h] (the pad dropped)."""
        if not self.packed:
            return x.transpose(0, 1)
        return x[: tiles * self.tokens_per_tile, 0].view(tiles, self.tokens_per_tile, -1)
