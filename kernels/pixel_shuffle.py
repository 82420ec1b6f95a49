"""InternVL's pixel shuffle as one gather: [n, g*g, c] -> [n, (g/k)^2, c*k^2] with downsample_ratio r = 1/k.

It is a pure permutation. Following the reference's views, output token t and channel q read
    x[b, (i'*k + q // (c*k)) * g + j'*k + (q // c) % k, q % c]
with (i', j') = divmod(t, g/k) for 'v2' and (j', i') = divmod(t, g/k) for 'v1' (left transposed).
The backward is the inverse: the same index pair, reading grad_out and writing grad_x (each element once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sail_megatron.kernels._common import Impl, block_size, use_triton

PS_VERSIONS: tuple[str, ...] = ("v1", "v2")


def pixel_shuffle_reference(x: torch.Tensor, downsample_ratio: float = 0.5, ps_version: str = "v2") -> torch.Tensor:
    """InternVL's pixel shuffle, copied line for line."""
    n, num_patches, c = x.shape
    g = int(round(num_patches**0.5))
    r = downsample_ratio
    x = x.reshape(n, g, g, c)
    x = x.view(n, g, int(g * r), int(c / r))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(g * r), int(g * r), int(c / (r * r)))
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, x.shape[-1])


@triton.jit
def _pixel_shuffle_kernel(
    x_ptr,
    o_ptr,
    sxb,
    sxt,
    sxc,
    sob,
    sot,
    soc,
    T_out,
    n_tb,
    C_out,
    c,
    g,
    G,
    k,
    V2: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    # Tiles walk the output [n, T_out, C_out]; program 0-axis = (tile, token block), 1-axis = channel block.
    b = (tl.program_id(0) // n_tb).to(tl.int64)
    t = (tl.program_id(0) % n_tb) * BLOCK_T + tl.arange(0, BLOCK_T)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    if V2:
        i2 = t // G
        j2 = t % G
    else:
        j2 = t // G
        i2 = t % G
    i = i2[:, None] * k + (q // (c * k))[None, :]
    j = j2[:, None] * k + ((q // c) % k)[None, :]
    ch = (q % c)[None, :]
    x_off = b * sxb + (i * g + j).to(tl.int64) * sxt + ch.to(tl.int64) * sxc
    o_off = b * sob + t.to(tl.int64)[:, None] * sot + q.to(tl.int64)[None, :] * soc
    ok = (t < T_out)[:, None] & (q < C_out)[None, :]
    if BACKWARD:
        tl.store(x_ptr + x_off, tl.load(o_ptr + o_off, mask=ok), mask=ok)
    else:
        tl.store(o_ptr + o_off, tl.load(x_ptr + x_off, mask=ok), mask=ok)


def _launch(x: torch.Tensor, o: torch.Tensor, g: int, k: int, v2: bool, backward: bool) -> None:
    n, t_out, c_out = o.shape
    if not (n and t_out and c_out):
        return
    block_q = block_size(c_out, 1024)
    block_t = block_size(max(1, 4096 // block_q), triton.next_power_of_2(t_out))
    n_tb = triton.cdiv(t_out, block_t)  # token blocks per tile
    grid = (n * n_tb, triton.cdiv(c_out, block_q))
    _pixel_shuffle_kernel[grid](
        x,
        o,
        *x.stride(),
        *o.stride(),
        t_out,
        n_tb,
        c_out,
        x.shape[2],
        g,
        g // k,
        k,
        V2=v2,
        BACKWARD=backward,
        BLOCK_T=block_t,
        BLOCK_Q=block_q,
    )


class _PixelShuffle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, g: int, k: int, v2: bool) -> torch.Tensor:
        n, _, c = x.shape
        out = torch.empty((n, (g // k) ** 2, c * k * k), dtype=x.dtype, device=x.device)
        _launch(x, out, g, k, v2, backward=False)
        ctx.x_shape, ctx.g, ctx.k, ctx.v2 = x.shape, g, k, v2
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # A permutation writes every input element exactly once, so empty() + scatter needs no zeroing/atomics.
        grad_x = torch.empty(ctx.x_shape, dtype=grad_out.dtype, device=grad_out.device)
        _launch(grad_x, grad_out, ctx.g, ctx.k, ctx.v2, backward=True)
        return grad_x, None, None, None


def _validate(x: torch.Tensor, downsample_ratio: float, ps_version: str) -> tuple[int, int]:
    if x.dim() != 3:
        raise ValueError(f"pixel_shuffle: x must be [tiles, patches, channels], got shape {tuple(x.shape)}")
    if ps_version not in PS_VERSIONS:
        raise ValueError(f"pixel_shuffle: ps_version must be one of {PS_VERSIONS}, got {ps_version!r}")
    n, num_patches, c = x.shape
    g = int(round(num_patches**0.5))
    if g * g != num_patches:
        raise ValueError(f"pixel_shuffle needs a square patch grid, got {num_patches} patches")
    if not 0 < downsample_ratio <= 1:
        raise ValueError(f"pixel_shuffle: downsample_ratio must be 1/k for an integer k >= 1, got {downsample_ratio}")
    k = int(round(1 / downsample_ratio))
    if abs(k * downsample_ratio - 1) > 1e-6:
        raise ValueError(f"pixel_shuffle: downsample_ratio must be 1/k for an integer k, got {downsample_ratio}")
    if g % k:
        raise ValueError(
            f"pixel_shuffle: the {g}x{g} patch grid does not split into {k}x{k} blocks "
            f"(downsample_ratio {downsample_ratio})"
        )
    # The reference's int(g*r), int(c/r), int(c/r^2) must come out exact, or its views disagree with k.
    r = downsample_ratio
    if int(g * r) != g // k or int(c / r) != c * k or int(c / (r * r)) != c * k * k:
        raise ValueError(
            f"pixel_shuffle: downsample_ratio {downsample_ratio} is not exact in floating point "
            f"for g={g}, c={c}; use 0.5 / 0.25 or a grid where int(g*r) == g/k"
        )
    return g, k


def pixel_shuffle(
    x: torch.Tensor, downsample_ratio: float = 0.5, ps_version: str = "v2", impl: Impl = "auto"
) -> torch.Tensor:
    """[n, g*g, c] -> [n, (g*r)^2, c/r^2], bit-identical to InternVL's; differentiable."""
    g, k = _validate(x, downsample_ratio, ps_version)
    if not use_triton(impl, _pixel_shuffle_kernel, x):
        return pixel_shuffle_reference(x, downsample_ratio, ps_version)
    return _PixelShuffle.apply(x, g, k, ps_version == "v2")
