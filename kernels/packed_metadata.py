"""Per-token metadata of a packed sequence: position ids restarting per sample, and the `<IMG_CONTEXT>` slots.

The image positions have a data-dependent length M, so the Triton path is two-pass:
  pass 1 (one program per block of tokens): position ids, and the number of image tokens in the block;
  scan:   exclusive prefix sum of the per-block counts (torch.cumsum on the device, a few hundred ints);
  pass 2: each block writes its image indices at its offset + the in-block rank (an inclusive scan).
Allocating the [M] output needs M on the host: one sync, as in torch.nonzero. Pass `num_image_tokens`
(e.g. tiles * tokens_per_tile, known to the data loader) to skip it; the path then has no host round trip.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sail_megatron.kernels._common import Impl, add_combine, block_size, check_same_device, use_triton

_MAX_BLOCK = 1024  # tokens per program; the scan in between then covers N/1024 counts


def packed_metadata_reference(
    tokens: torch.Tensor, cu_seqlens: torch.Tensor, image_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch (repeat_interleave and nonzero sync on a GPU; fine for a reference)."""
    n = tokens.numel()
    cu = cu_seqlens.long()
    sample = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=tokens.device), cu.diff(), output_size=n)
    position_ids = torch.arange(n, device=tokens.device) - cu[sample]
    image_positions = torch.nonzero(tokens == image_token_id).flatten()
    return position_ids, image_positions


@triton.jit
def _positions_and_count_kernel(
    tokens_ptr, cu_ptr, pos_ptr, counts_ptr, N, B, search_steps, image_token_id, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    # Vectorised binary search for the sample of each token: the last s in [0, B) with cu[s] <= i.
    # Invariant cu[lo] <= i (cu[0] == 0); empty samples (cu[s] == cu[s+1]) are skipped by "last".
    lo = tl.full([BLOCK], 0, dtype=tl.int32)
    hi = tl.full([BLOCK], B - 1, dtype=tl.int32)
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        go_right = tl.load(cu_ptr + mid) <= offs
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    start = tl.load(cu_ptr + lo)
    tl.store(pos_ptr + offs, (offs - start).to(tl.int64), mask=ok)
    is_img = (tl.load(tokens_ptr + offs, mask=ok) == image_token_id) & ok
    tl.store(counts_ptr + tl.program_id(0), tl.reduce(is_img.to(tl.int32), 0, add_combine))


@triton.jit
def _write_image_positions_kernel(tokens_ptr, block_start_ptr, out_ptr, N, M, image_token_id, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    is_img = ((tl.load(tokens_ptr + offs, mask=ok) == image_token_id) & ok).to(tl.int32)
    rank = tl.associative_scan(is_img, 0, add_combine) - is_img  # exclusive in-block rank: output stays ascending
    dst = tl.load(block_start_ptr + tl.program_id(0)) + rank
    tl.store(out_ptr + dst, offs.to(tl.int64), mask=(is_img > 0) & (dst < M))  # dst < M: a too-small hint


def _packed_metadata_triton(
    tokens: torch.Tensor, cu_seqlens: torch.Tensor, image_token_id: int, num_image_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    n, dev = tokens.numel(), tokens.device
    position_ids = torch.empty(n, dtype=torch.int64, device=dev)
    block = block_size(n, _MAX_BLOCK)  # smaller only for short inputs (N < 1024)
    n_blocks = triton.cdiv(n, block)
    counts = torch.empty(n_blocks, dtype=torch.int64, device=dev)
    b = cu_seqlens.numel() - 1
    if n:
        steps = max(1, (b - 1).bit_length())  # ceil(log2(B)) halvings of [0, B)
        _positions_and_count_kernel[(n_blocks,)](
            tokens, cu_seqlens, position_ids, counts, n, b, steps, image_token_id, BLOCK=block
        )
    block_start = torch.cumsum(counts, 0) - counts
    m = int(counts.sum()) if num_image_tokens is None else num_image_tokens  # the one host sync, if no hint
    # -1 fill with a hint: if it is larger than the true count, the tail is recognisably invalid, not garbage.
    if num_image_tokens is None:
        image_positions = torch.empty(m, dtype=torch.int64, device=dev)
    else:
        image_positions = torch.full((m,), -1, dtype=torch.int64, device=dev)
    if n and m:
        _write_image_positions_kernel[(n_blocks,)](
            tokens, block_start, image_positions, n, m, image_token_id, BLOCK=block
        )
    return position_ids, image_positions


def _validate(tokens: torch.Tensor, cu_seqlens: torch.Tensor, num_image_tokens: int | None) -> None:
    int_types = (torch.int64, torch.int32)
    if tokens.dim() != 1 or tokens.dtype not in int_types:
        raise ValueError(
            f"packed_metadata: tokens must be a 1-D int64/int32 tensor, got {tokens.dtype} "
            f"of shape {tuple(tokens.shape)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in int_types:
        raise ValueError(
            f"packed_metadata: cu_seqlens must be a 1-D int32/int64 tensor of B+1 >= 2 offsets, "
            f"got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    check_same_device("packed_metadata", tokens, cu_seqlens)
    if num_image_tokens is not None and num_image_tokens < 0:
        raise ValueError(f"packed_metadata: num_image_tokens must be >= 0, got {num_image_tokens}")
    if not cu_seqlens.is_cuda:  # value checks only where they cost no device sync
        n = tokens.numel()
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n:
            raise ValueError(
                f"packed_metadata: cu_seqlens must run from 0 to N={n}, got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}"
            )
        if bool((cu_seqlens.diff() < 0).any()):
            raise ValueError("packed_metadata: cu_seqlens must be non-decreasing")


def packed_metadata(
    tokens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    image_token_id: int,
    impl: Impl = "auto",
    num_image_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [N], cu_seqlens [B+1] -> (position_ids [N] int64, image_positions [M] int64 ascending).

    num_image_tokens: optional known M; saves the Triton path its host sync. If it is wrong the result is
    truncated or padded with -1 (the reference ignores it and always returns the true positions).
    """
    _validate(tokens, cu_seqlens, num_image_tokens)
    if not use_triton(impl, _positions_and_count_kernel, tokens, cu_seqlens):
        return packed_metadata_reference(tokens, cu_seqlens, image_token_id)
    return _packed_metadata_triton(tokens.contiguous(), cu_seqlens.contiguous(), image_token_id, num_image_tokens)
