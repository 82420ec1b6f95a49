"""Tensor layout changes between Hugging Face and megatron-core weights (pure functions, both ways).

- qkv: HF keeps q, k, v apart (Qwen2, Qwen3) or stacked `[q_all; k_all; v_all]` (InternViT, AIMv2 `attn.qkv`);
  megatron's `linear_qkv` interleaves per KV group `[q heads of group g; k_g; v_g]` for g = 0..G-1,
  so a TP rank's contiguous slice holds whole groups. Biases follow the rows.
- fc1: megatron's SwiGLU `linear_fc1` is `cat([gate, up])`; its sharded checkpoint layout keeps that
  order for any TP (gate shards first, then up shards), so TP never enters here.
- vocabulary: megatron pads the embedding/output rows for TP; export keeps the first `vocab_size`.
Every function is exact (only views, cats and copies): HF -> megatron -> HF is bitwise.
"""

from typing import Tuple

import torch


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> int:
    if num_heads % num_groups:
        raise ValueError(f"{num_heads} attention heads do not split into {num_groups} KV groups")
    if q.shape[0] % num_heads:
        raise ValueError(f"q has {q.shape[0]} rows, not a multiple of {num_heads} heads")
    head_dim = q.shape[0] // num_heads
    expected = num_groups * head_dim
    if k.shape[0] != expected or v.shape[0] != expected:
        raise ValueError(f"k/v have {k.shape[0]}/{v.shape[0]} rows, expected {num_groups} groups x {head_dim}")
    return head_dim


def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """Separate q [H*d, ...], k/v [G*d, ...] -> megatron's per-group interleave [G*(H/G+2)*d, ...]."""
    d = _check_qkv(q, k, v, num_heads, num_groups)
    rest = q.shape[1:]
    per_group = num_heads // num_groups
    grouped = torch.cat(
        [q.reshape(num_groups, per_group * d, *rest), k.reshape(num_groups, d, *rest), v.reshape(num_groups, d, *rest)],
        dim=1,
    )
    return grouped.reshape(num_groups * (per_group + 2) * d, *rest)


def qkv_from_mcore(
    qkv: torch.Tensor, num_heads: int, num_groups: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `qkv_to_mcore`: megatron's interleave -> contiguous q, k, v."""
    if num_heads % num_groups:
        raise ValueError(f"{num_heads} attention heads do not split into {num_groups} KV groups")
    per_group = num_heads // num_groups
    rows = qkv.shape[0]
    if rows % (num_groups * (per_group + 2)):
        raise ValueError(f"linear_qkv has {rows} rows, not {num_groups} groups x ({per_group} + 2) heads")
    d = rows // (num_groups * (per_group + 2))
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_groups, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return (
        q.reshape(num_heads * d, *rest).contiguous(),
        k.reshape(num_groups * d, *rest).contiguous(),
        v.reshape(num_groups * d, *rest).contiguous(),
    )


def stacked_qkv_to_mcore(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """InternViT `attn.qkv` rows `[q_all; k_all; v_all]` -> megatron's per-head interleave (no GQA)."""
    if qkv.shape[0] % 3:
        raise ValueError(f"attn.qkv has {qkv.shape[0]} rows, not a multiple of 3")
    q, k, v = torch.chunk(qkv, 3, dim=0)
    return qkv_to_mcore(q, k, v, num_heads, num_heads)


def stacked_qkv_from_mcore(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of `stacked_qkv_to_mcore`."""
    return torch.cat(qkv_from_mcore(qkv, num_heads, num_heads), dim=0)


def fc1_to_mcore(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate_proj and up_proj -> megatron's fused `linear_fc1` = cat([gate, up])."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return torch.cat([gate, up], dim=0)


def fc1_from_mcore(fc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `fc1_to_mcore`."""
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 has {fc1.shape[0]} rows, not an even number")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Embedding/output rows padded with zeros to megatron's padded vocabulary."""
    if padded_rows < weight.shape[0]:
        raise ValueError(f"cannot pad {weight.shape[0]} vocabulary rows down to {padded_rows}")
    out = weight.new_zeros((padded_rows, *weight.shape[1:]))
    out[: weight.shape[0]] = weight
    return out


def strip_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The released vocabulary's rows of a padded megatron embedding/output weight."""
    if weight.shape[0] < vocab_size:
        raise ValueError(f"the weight has {weight.shape[0]} rows, fewer than the vocabulary's {vocab_size}")
    return weight[:vocab_size].contiguous()
