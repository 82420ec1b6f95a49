"""Shared pieces of the kernels: the `impl` dispatch rule and a bf16 cast that rounds the same everywhere.

Interpreter note: `@triton.jit` picks compiled vs interpreted *when the decorator runs*, i.e. when a kernel
module is imported (triton.knobs reads TRITON_INTERPRET at that moment). So TRITON_INTERPRET=1 must be in
the environment before `sail_megatron.kernels.<module>` is first imported; setting it later has no effect.

Kernels here use only Triton builtins and their own @triton.jit helpers, never the library's @jit helpers
(tl.cdiv, tl.zeros, tl.sum, tl.cumsum, ...): those are decorated when `triton` itself is imported, so
when something (megatron-core, torch) imported triton before TRITON_INTERPRET was set, as in a full test run,
they stay compiled and the interpreter cannot call them. Our own helpers get re-decorated with our modules.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Literal

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

Impl = Literal["auto", "triton", "reference"]
IMPLS: tuple[str, ...] = ("auto", "triton", "reference")

# What callers asking for "auto" get inside a `prefer()` block (benchmarks compare the two); a context
# variable, so a block changes only its own thread or task.
_auto_choice: ContextVar[str] = ContextVar("sail_megatron_kernel_impl", default="auto")


@contextmanager
def prefer(impl: str) -> Iterator[None]:
    """Within the block, kernels called with impl='auto' use `impl` ('triton' or 'reference')."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    token = _auto_choice.set(impl)
    try:
        yield
    finally:
        _auto_choice.reset(token)


def use_triton(impl: str, kernel: object, *tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run, False for the PyTorch reference.

    auto: Triton on CUDA, the reference elsewhere. triton: always Triton, which on CPU tensors only works
    under the interpreter (tests), so say so instead of letting Triton fail on a host pointer.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        impl = _auto_choice.get()
    if impl == "reference":
        return False
    if impl == "auto":
        return on_cuda
    if not on_cuda and isinstance(kernel, JITFunction):  # compiled (not interpreted) kernel, host tensors
        raise ValueError(
            "impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "sail_megatron.kernels is imported (Triton's CPU interpreter)"
        )
    return True


def check_same_device(name: str, *tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{name}: all inputs must be on one device, got {sorted(map(str, devices))}")


def block_size(n: int, cap: int) -> int:
    """Power of two >= n (Triton block shapes must be powers of two), at most cap."""
    return min(triton.next_power_of_2(max(n, 1)), cap)


@triton.jit
def add_combine(a, b):
    """Combine function for tl.reduce / tl.associative_scan sums (instead of tl.sum / tl.cumsum, see above)."""
    return a + b


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """Cast a float block to `dtype`, rounding to nearest even exactly as torch's `.to()` does.

    Why not plain `.to()`: the CPU interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even),
    so interpreted tests would not be bit-exact. Rounding by hand on the bits is the same on both.
    """
    if x.dtype == dtype:
        return x
    elif dtype == tl.bfloat16:
        f = x.to(tl.float32)  # exact from fp16/bf16/fp32
        bits = f.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round half to even on the 16 dropped bits
        rounded = tl.where(f != f, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN, never inf
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
