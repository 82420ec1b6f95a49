"""Lets megatron-core run on a machine without CUDA by redirecting its CUDA-only calls to the CPU.

Installed only when CUDA is absent (`install_cpu_emulation` refuses otherwise), so it can never
hide inside the GPU path. What it redirects, and why (measured with megatron-core 0.16.1):
- `torch.cuda.current_device()`: used directly for buffers and RoPE; answers the CPU device.
- CUDA RNG state in `tensor_parallel.random`: backed by the CPU generator, so the TP RNG tracker works.
- `device='cuda'` literals and `.cuda()` (optimizer, grad clipping): mapped to the CPU by a
  TorchFunctionMode.
- `Tensor.type()` on CPU float tensors reports the CUDA name, for asserts in `clip_grads`.
- `torch.cuda.synchronize` / `empty_cache` / memory queries: harmless no-ops.
"""

import threading

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_lock = threading.Lock()
_CPU = torch.device("cpu")


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False  # integer ordinals are only produced by our own current_device() (the CPU)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch call on this thread."""

    _TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                   torch.bfloat16: "torch.cuda.BFloat16Tensor"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = self._TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


def _own_noop(name: str):
    """A distinct no-op per patched function: torch.compile's rule table maps functions by identity and
    refuses one object standing for several torch.cuda functions (seen when transformers runs after this)."""
    def noop(*args, **kwargs):
        return None

    noop.__name__ = noop.__qualname__ = f"cpu_emulated_{name}"
    return noop


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))


def _patch_causal_mask() -> None:
    # Built with the literal device="cuda"; recomputation in the backward pass calls it where the mode
    # above is not on the stack, so the function itself is replaced (in the modules that imported it).
    from functools import lru_cache

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @lru_cache(maxsize=None)
    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()

    utils.get_default_causal_mask = causal_mask
    fused_softmax.get_default_causal_mask = causal_mask


def install_cpu_emulation() -> None:
    """Install the redirections for this process (idempotent). Refuses when CUDA is available."""
    global _installed
    if torch.cuda.is_available():
        raise RuntimeError("CPU emulation of CUDA must not be installed on a machine with CUDA")
    with _lock:
        if _installed:
            return
        torch.cuda.current_device = lambda: _CPU
        torch.cuda.set_device = _own_noop("set_device")
        torch.cuda.synchronize = _own_noop("synchronize")
        torch.cuda.empty_cache = _own_noop("empty_cache")
        torch.cuda.memory_allocated = lambda *a, **k: 0
        torch.cuda.max_memory_allocated = lambda *a, **k: 0
        torch.cuda.reset_peak_memory_stats = _own_noop("reset_peak_memory_stats")
        _patch_rng()
        _patch_causal_mask()
        # Enter the mode for the lifetime of the process (it is a thread-local stack; the autograd
        # engine runs CPU backward on the calling thread, so one entry covers training).
        _CudaToCpuMode().__enter__()
        _installed = True


def cpu_emulation_installed() -> bool:
    return _installed
