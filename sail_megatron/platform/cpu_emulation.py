"""Lets megatron-core run on a machine without CUDA by redirecting its CUDA-only calls to the CPU.

Active only while a process group runs without CUDA (`init_distributed` enters it, `destroy_distributed`
leaves it and every original comes back); it refuses to start when CUDA is available, so it can never
hide inside the GPU path. What it redirects, and why (measured with megatron-core 0.16.1):
- `torch.cuda.current_device()`: used directly for buffers and RoPE; answers the CPU device.
- CUDA RNG state (`torch.cuda` and megatron's tracker, see `megatron_compat.py`): the CPU generator.
- megatron's default causal mask: built on the CPU (`megatron_compat.py`).
- `device='cuda'` literals and `.cuda()` (optimizer, grad clipping): mapped to the CPU by a
  TorchFunctionMode.
- `Tensor.type()` on CPU float tensors reports the CUDA name, for asserts in `clip_grads`.
- `torch.cuda.synchronize` / `empty_cache` / memory queries: harmless no-ops.
- `torch.cuda.Stream`, `current_stream`, `stream(...)` and the events a stream records (megatron's MoE
  all-to-all token dispatcher copies its split sizes to the host on a side stream): host stand-ins whose
  waits do nothing, since everything runs in order on the calling thread.
"""

import contextlib
from typing import Iterator, List

import torch
from torch.overrides import TorchFunctionMode

from sail_megatron.platform.megatron_compat import Patch, Patches, megatron_on_cpu

_CPU = torch.device("cpu")


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False  # integer ordinals are only produced by our own current_device() (the CPU)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch call on this thread."""

    _TYPE_NAMES = {
        torch.float32: "torch.cuda.FloatTensor",
        torch.float16: "torch.cuda.HalfTensor",
        torch.bfloat16: "torch.cuda.BFloat16Tensor",
    }

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


class _HostEvent:
    """A CUDA event on the host: the work before it is done when it is recorded."""

    def record(self, stream=None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def wait(self, stream=None) -> None:
        return None

    def query(self) -> bool:
        return True


class _HostStream:
    """A CUDA stream on the host: all work runs in order on the calling thread, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        return None

    def wait_event(self, event) -> None:
        return None

    def record_event(self, event=None) -> _HostEvent:
        return event if event is not None else _HostEvent()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_HOST_STREAM = _HostStream()


def _current_stream(device=None) -> _HostStream:
    return _HOST_STREAM


def _use_stream(stream=None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext(stream)


def _torch_cuda_patches() -> List[Patch]:
    cuda = torch.cuda
    return [
        (cuda, "Stream", _HostStream),
        (cuda, "current_stream", _current_stream),
        (cuda, "stream", _use_stream),
        (cuda, "current_device", lambda: _CPU),
        (cuda, "set_device", _own_noop("set_device")),
        (cuda, "synchronize", _own_noop("synchronize")),
        (cuda, "empty_cache", _own_noop("empty_cache")),
        (cuda, "memory_allocated", lambda *a, **k: 0),
        (cuda, "max_memory_allocated", lambda *a, **k: 0),
        (cuda, "reset_peak_memory_stats", _own_noop("reset_peak_memory_stats")),
        (cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state()),
        (cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        (cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed))),
        (cuda, "manual_seed_all", lambda seed: torch.default_generator.manual_seed(int(seed))),
    ]


_torch_cuda_on_cpu = Patches(_torch_cuda_patches)


class CpuEmulation:
    """The CPU layer as one scope: torch.cuda stand-ins, megatron's CPU patches and the device mode."""

    def __init__(self):
        self._mode = None

    def __enter__(self) -> "CpuEmulation":
        if torch.cuda.is_available():
            raise RuntimeError("CPU emulation of CUDA must not be installed on a machine with CUDA")
        _torch_cuda_on_cpu.__enter__()
        megatron_on_cpu.__enter__()
        # The mode is a thread-local stack; the autograd engine runs CPU backward on the calling thread,
        # so one entry covers training on this thread.
        self._mode = _CudaToCpuMode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        megatron_on_cpu.__exit__()
        _torch_cuda_on_cpu.__exit__()


_process_scope: List[CpuEmulation] = []


def enter_cpu_emulation() -> None:
    """Start the CPU layer for this process's process group (`destroy_distributed` ends it)."""
    scope = CpuEmulation()
    scope.__enter__()
    _process_scope.append(scope)


def exit_cpu_emulation() -> None:
    if _process_scope:
        _process_scope.pop().__exit__()


@contextlib.contextmanager
def cpu_emulation() -> Iterator[CpuEmulation]:
    """The CPU layer for a `with` block (tests, one-off tools)."""
    with CpuEmulation() as scope:
        yield scope


def cpu_emulation_installed() -> bool:
    return _torch_cuda_on_cpu.active
