"""Core attention for packed (THD) sequences on megatron-core's local layer spec.

megatron-core's local DotProductAttention refuses packed sequences; only Transformer Engine's takes
them. This subclass keeps the local behaviour for ordinary batches and, given `packed_seq_params`
(qkv_format 'thd'), attends within each packed sample only: causally in the decoder, both ways in the
ViT's packed tiles (the layer's mask type says which). SDPA under a block-diagonal mask on the CPU (the
reference), flex_attention's document masking on CUDA.
"""

import functools
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[t] index of the packed sample each position belongs to."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)


def document_mask(cu_seqlens: torch.Tensor, total: int, causal: bool = True) -> torch.Tensor:
    """[t, t] bool, True where query i may attend to key j: same sample (and j <= i when causal)."""
    seg = segment_ids(cu_seqlens, total)
    same = seg[:, None] == seg[None, :]
    if not causal:
        return same
    return same & torch.ones(total, total, dtype=torch.bool, device=cu_seqlens.device).tril_()


def document_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[t, t] bool, True where query i may attend to key j: same sample and j <= i."""
    return document_mask(cu_seqlens, total, causal=True)


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _document_causal_mod(seg: torch.Tensor) -> Callable:
    """flex_attention's mask_mod: same sample and kv_idx <= q_idx."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (seg[q_idx] == seg[kv_idx]) & (kv_idx <= q_idx)

    return mask_mod


def _document_mod(seg: torch.Tensor) -> Callable:
    """flex_attention's mask_mod: same sample."""

    def mask_mod(b, h, q_idx, kv_idx):
        return seg[q_idx] == seg[kv_idx]

    return mask_mod


def document_block_mask(cu_seqlens: torch.Tensor, total: int, device: torch.device, causal: bool = True):
    """flex_attention's BlockMask for a packed row: within each sample (causally, or both ways)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids(cu_seqlens, total)
    mod = _document_causal_mod(seg) if causal else _document_mod(seg)
    return create_block_mask(mod, None, None, total, total, device=device)


def _version_of(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


class LastBlockMask:
    """The block mask of the last packed row seen. Every layer of a micro-batch gets the same
    cu_seqlens tensor (one PackedSeqParams per forward), so the mask is built once per micro-batch
    and all layers share one BlockMask and mask_mod (the compiled flex_attention sees no new closure)."""

    def __init__(self, build: Callable = document_block_mask):
        self.build = build
        self._cu: Optional[torch.Tensor] = None
        self._key: Optional[Tuple] = None
        self._mask = None

    def __call__(self, cu_seqlens: torch.Tensor, total: int, device: torch.device):
        version = _version_of(cu_seqlens)
        if version is None:
            return self.build(cu_seqlens, total, device)
        # The tensor itself is held and compared by identity: a freed tensor's id or data_ptr can come
        # back for the next micro-batch's cu_seqlens. The version catches an in-place update.
        key = (version, total, torch.device(device))
        if cu_seqlens is not self._cu or key != self._key:
            self._mask = self.build(cu_seqlens, total, device)
            self._cu, self._key = cu_seqlens, key
        return self._mask


_block_masks = {
    True: LastBlockMask(),  # decoder: causal
    False: LastBlockMask(functools.partial(document_block_mask, causal=False)),  # ViT tiles
}


def _flex_document_attention(q, k, v, cu_seqlens, scale, causal: bool = True):
    block_mask = _block_masks[causal](cu_seqlens, q.shape[2], q.device)
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class PackedDotProductAttention(DotProductAttention):
    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params: PackedSeqParams = None,
    ):
        if packed_seq_params is None:
            return super().forward(
                query,
                key,
                value,
                attention_mask,
                attn_mask_type=attn_mask_type,
                attention_bias=attention_bias,
                packed_seq_params=None,
            )
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed attention takes qkv_format 'thd', got {packed_seq_params.qkv_format!r}")
        # THD: query [t, heads, d]; key/value [t, groups, d] (GQA) -> SDPA's [1, heads, t, d].
        total = query.shape[0]
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
        cu = packed_seq_params.cu_seqlens_q
        causal = (attn_mask_type or self.attn_mask_type) in _CAUSAL
        dropout = self.attention_dropout.p if self.training else 0.0
        if q.is_cuda and dropout == 0.0:
            out = _flex_document_attention(q, k, v, cu, self.softmax_scale, causal)
        else:
            if k.shape[1] != q.shape[1]:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            mask = document_mask(cu, total, causal)
            with tensor_parallel.get_cuda_rng_tracker().fork():  # dropout differs per TP rank, as in megatron
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale
                )
        return out.squeeze(0).permute(1, 0, 2).reshape(total, -1)  # [t, heads * d]
