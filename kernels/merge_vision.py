"""Scatter projected vision tokens into the packed text embeddings at the `<IMG_CONTEXT>` slots.

out = text with rows `positions` replaced by `vision` (cast to text's dtype). Backward: grad_text is grad_out
with those rows zeroed, grad_vision = grad_out[positions]. `positions` must be unique (ascending in practice);
that and their range are only checked for host tensors, since checking device tensors would sync. On the
Triton path a -1 position (packed_metadata's padding) is dropped with its vision row (zero gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sail_megatron.kernels._common import Impl, block_size, cast_rne, check_same_device, use_triton


def merge_vision_reference(text: torch.Tensor, vision: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch; index_copy is out of place and differentiable in both text and vision."""
    return text.index_copy(0, positions.long(), vision.to(text.dtype))


def _row_source_map(n: int, positions: torch.Tensor) -> torch.Tensor:
    # src[i] = index into vision for rows that take a vision token, -1 for text rows. One N-int pass lets
    # forward and backward each be a single pass over the N rows (no separate clone + scatter), no sync.
    # Entry N is scratch and cut off: a -1 slot (packed_metadata pads with -1 when its num_image_tokens
    # hint is too large) wraps to it instead of to the last row, so its vision token is dropped. Device
    # positions are not range-checked (that would sync), hence this rather than a check.
    src = torch.full((n + 1,), -1, dtype=torch.int32, device=positions.device)
    src[positions.long()] = torch.arange(positions.numel(), dtype=torch.int32, device=positions.device)
    return src[:n]


@triton.jit
def _merge_fwd_kernel(
    text_ptr, vision_ptr, src_ptr, out_ptr, N, H, s_text, s_vision, s_out, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < N
    src = tl.load(src_ptr + rows, mask=row_ok, other=-1)
    is_vis = (src >= 0)[:, None]
    ok = row_ok[:, None] & (cols < H)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    # Masked loads: each row is read from exactly one of the two sources.
    t = tl.load(text_ptr + rows64 * s_text + cols[None, :], mask=ok & ~is_vis)
    v = tl.load(vision_ptr + src.to(tl.int64)[:, None] * s_vision + cols[None, :], mask=ok & is_vis)
    out = tl.where(is_vis, cast_rne(v, out_ptr.dtype.element_ty), t)
    tl.store(out_ptr + rows64 * s_out + cols[None, :], out, mask=ok)


@triton.jit
def _merge_bwd_kernel(
    grad_ptr,
    src_ptr,
    grad_text_ptr,
    grad_vision_ptr,
    N,
    H,
    s_grad,
    s_gt,
    s_gv,
    WRITE_TEXT: tl.constexpr,
    WRITE_VISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < N
    src = tl.load(src_ptr + rows, mask=row_ok, other=-1)
    is_vis = (src >= 0)[:, None]
    ok = row_ok[:, None] & (cols < H)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    g = tl.load(grad_ptr + rows64 * s_grad + cols[None, :], mask=ok)
    if WRITE_TEXT:
        zero = tl.full([BLOCK_R, BLOCK_H], 0, g.dtype)
        tl.store(grad_text_ptr + rows64 * s_gt + cols[None, :], tl.where(is_vis, zero, g), mask=ok)
    if WRITE_VISION:
        dst = grad_vision_ptr + src.to(tl.int64)[:, None] * s_gv + cols[None, :]
        tl.store(dst, cast_rne(g, grad_vision_ptr.dtype.element_ty), mask=ok & is_vis)


def _grid_and_blocks(n: int, h: int) -> tuple[tuple[int, int], int, int]:
    # ~4K elements per program: full 512-wide row chunks for real hidden sizes, more rows when H is small.
    block_h = block_size(h, 512)
    block_r = max(1, 4096 // block_h)
    return (triton.cdiv(n, block_r), triton.cdiv(h, block_h)), block_r, block_h


def _merge_fwd_triton(text: torch.Tensor, vision: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    n, h = text.shape
    out = torch.empty_like(text, memory_format=torch.contiguous_format)
    if n and h:
        grid, block_r, block_h = _grid_and_blocks(n, h)
        _merge_fwd_kernel[grid](
            text,
            vision,
            src,
            out,
            n,
            h,
            text.stride(0),
            vision.stride(0),
            out.stride(0),
            BLOCK_R=block_r,
            BLOCK_H=block_h,
        )
    return out


class _MergeVision(torch.autograd.Function):
    @staticmethod
    def forward(ctx, text: torch.Tensor, vision: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        src = _row_source_map(text.shape[0], positions)
        ctx.save_for_backward(src)
        ctx.vision_shape, ctx.vision_dtype = vision.shape, vision.dtype
        return _merge_fwd_triton(text, vision, src)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (src,) = ctx.saved_tensors
        want_text, want_vision = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_out = grad_out.contiguous()
        n, h = grad_out.shape
        grad_text = torch.empty_like(grad_out) if want_text else None
        # Zeros, not empty: a vision row dropped through a -1 slot is in no output row, the kernel never
        # writes its gradient, and that gradient is 0.
        grad_vision = (
            torch.zeros(ctx.vision_shape, dtype=ctx.vision_dtype, device=grad_out.device) if want_vision else None
        )
        if n and h and (want_text or want_vision):
            grid, block_r, block_h = _grid_and_blocks(n, h)
            # Unused outputs get grad_out as a never-written placeholder pointer.
            gt = grad_text if want_text else grad_out
            gv = grad_vision if want_vision else grad_out
            _merge_bwd_kernel[grid](
                grad_out,
                src,
                gt,
                gv,
                n,
                h,
                grad_out.stride(0),
                gt.stride(0),
                gv.stride(0),
                WRITE_TEXT=want_text,
                WRITE_VISION=want_vision,
                BLOCK_R=block_r,
                BLOCK_H=block_h,
            )
        return grad_text, grad_vision, None


def _validate(text: torch.Tensor, vision: torch.Tensor, positions: torch.Tensor) -> None:
    if text.dim() != 2 or vision.dim() != 2:
        raise ValueError(
            f"merge_vision: text and vision must be 2-D [rows, hidden], got {tuple(text.shape)} "
            f"and {tuple(vision.shape)}"
        )
    if text.shape[1] != vision.shape[1]:
        raise ValueError(f"merge_vision: hidden sizes differ: text {text.shape[1]} vs vision {vision.shape[1]}")
    if not (text.is_floating_point() and vision.is_floating_point()):
        raise ValueError(f"merge_vision: text and vision must be floating point, got {text.dtype} and {vision.dtype}")
    if positions.dim() != 1 or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"merge_vision: positions must be a 1-D int64/int32 tensor, got "
            f"{positions.dtype} of shape {tuple(positions.shape)}"
        )
    if positions.numel() != vision.shape[0]:
        raise ValueError(f"merge_vision: {positions.numel()} positions for {vision.shape[0]} vision rows")
    if vision.shape[0] > text.shape[0]:
        raise ValueError(f"merge_vision: {vision.shape[0]} vision rows do not fit in {text.shape[0]} text rows")
    check_same_device("merge_vision", text, vision, positions)
    if not positions.is_cuda and positions.numel():  # value checks only where they cost no device sync
        if int(positions.min()) < 0 or int(positions.max()) >= text.shape[0]:
            raise ValueError(f"merge_vision: positions must lie in [0, {text.shape[0]})")
        if positions.numel() > 1 and bool((positions[1:] <= positions[:-1]).any()):
            raise ValueError("merge_vision: positions must be unique and sorted ascending")


def merge_vision(
    text: torch.Tensor, vision: torch.Tensor, positions: torch.Tensor, impl: Impl = "auto"
) -> torch.Tensor:
    """text [N, H], vision [M, H], positions [M] -> [N, H] in text's dtype, differentiable in text and vision."""
    _validate(text, vision, positions)
    if not use_triton(impl, _merge_fwd_kernel, text, vision, positions):
        return merge_vision_reference(text, vision, positions)
    # The kernels index rows by stride and columns densely.
    text = text if text.stride(1) == 1 else text.contiguous()
    vision = vision if vision.stride(1) == 1 else vision.contiguous()
    return _MergeVision.apply(text, vision, positions)
