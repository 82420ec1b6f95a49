"""Every change this project makes to megatron-core's own functions, in one place.

Written for megatron-core 0.16.1 (`MEGATRON_VERSION`); `tests/platform/test_megatron_compat.py` fails
when the installed megatron differs or when the source of any function replaced here has changed, so a
megatron upgrade re-checks each of them. Each patch is applied only inside a `Patches` scope and the
originals come back when it ends.

For the CPU (installed with the CPU layer, `cpu_emulation.py`; never with CUDA):
- `tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state`: the RNG tracker keeps the CPU
  generator's state instead of the CUDA one.
- `transformer.utils.get_default_causal_mask` (and its import in `fusions.fused_softmax`): builds the
  mask on the CPU. It uses the literal `device="cuda"`, and recomputation in the backward pass calls it
  outside the CPU layer's device redirection.
- `transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu`: the MoE all-to-all dispatcher copies its
  split sizes "to the host" with it, as numpy arrays on a GPU; it leaves CPU tensors as tensors, which
  torch's `all_to_all_single` does not take as split sizes. The CPU tensors here stand for device tensors, so
  they take the GPU path's form (numpy when asked).

Without Transformer Engine (any machine; `define_missing_te_names`, called by `init_distributed`):
- `transformer.moe.moe_utils.te_general_gemm`: imported only when TE imports, yet the MoE router's GEMM
  (`RouterGatingLinearFunction`) tests `te_general_gemm is not None` either way, so every MoE forward raised
  NameError. The name is defined as None, megatron's own "use torch.mm" (not a patch: nothing is replaced).

For torch's Adam (no Transformer Engine or apex fused Adam; applied around checkpoint saves and loads):
- `DistributedOptimizer._set_main_param_and_optimizer_states`: loading a `fully_reshardable` checkpoint
  restores `step` into every Adam state first and then copies each saved tensor, and the checkpoint
  holds no `step`: KeyError. The replacement skips exactly that key (already restored).
- `DistributedOptimizer.state_dict`: asserts one Adam `step`; a rank whose stage trains nothing (a frozen
  pipeline stage) has no Adam state at all, so its save failed. It reports step 0.
"""

import contextlib
import functools
import os
import threading
from functools import lru_cache
from typing import Any, Callable, Iterator, List, Tuple

import torch

MEGATRON_VERSION = "0.16.1"

Patch = Tuple[Any, str, Callable]


class Patches:
    """Replaces attributes for the life of a scope and puts the originals back; nested scopes of the same
    patches count (the first entry patches, the last exit restores)."""

    def __init__(self, build: Callable[[], List[Patch]]):
        self._build = build
        self._depth = 0
        self._saved: List[Tuple[Any, str, Any]] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "Patches":
        with self._lock:
            if self._depth == 0:
                patches = self._build()
                self._saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
                for owner, name, new in patches:
                    setattr(owner, name, new)
            self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for owner, name, old in reversed(self._saved):
                    setattr(owner, name, old)
                self._saved = []

    @property
    def active(self) -> bool:
        return self._depth > 0


# ------------------------------------------------------------------------------------------------ CPU


def _cpu_patches() -> List[Patch]:
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mpu_random
    from megatron.core.transformer import utils
    from megatron.core.transformer.moe import token_dispatcher

    cpu = torch.device("cpu")

    @lru_cache(maxsize=None)
    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device=cpu), diagonal=1).bool()

    def to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().numpy()
        return tensor

    return [
        (token_dispatcher, "maybe_move_tensor_to_cpu", to_host),
        (mpu_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()),
        (mpu_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        (utils, "get_default_causal_mask", causal_mask),
        (fused_softmax, "get_default_causal_mask", causal_mask),
    ]


megatron_on_cpu = Patches(_cpu_patches)


# ------------------------------------------------------------------------------------------ without TE


def define_missing_te_names() -> None:
    """Define `moe_utils.te_general_gemm` as None where Transformer Engine does not import (see above)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# ----------------------------------------------------------------------------------------- torch Adam


def _torch_adam_patches() -> List[Patch]:
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    cls = distrib_optimizer.DistributedOptimizer
    original_set_states, original_state_dict = cls._set_main_param_and_optimizer_states, cls.state_dict

    @functools.wraps(original_set_states)
    def set_states(self, model_param, tensors):
        group, order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group]["params"][order]
        step = self.optimizer.state[main_param].pop("step", None)
        try:
            return original_set_states(self, model_param, tensors)
        finally:
            if step is not None:
                self.optimizer.state[main_param]["step"] = step

    @functools.wraps(original_state_dict)
    def state_dict(self):
        inner = self.optimizer
        if inner.state:
            return original_state_dict(self)
        plain = inner.state_dict
        # Nothing on this rank has trained: describe it as step 0 (the "state" entry is dropped again).
        inner.state_dict = lambda: {**plain(), "state": {0: {"step": torch.tensor(0.0)}}}
        try:
            return original_state_dict(self)
        finally:
            del inner.state_dict

    return [(cls, "_set_main_param_and_optimizer_states", set_states), (cls, "state_dict", state_dict)]


torch_adam_checkpoints = Patches(_torch_adam_patches)


@contextlib.contextmanager
def torch_adam_checkpoint_fix() -> Iterator[None]:
    """Scope of a checkpoint save or load (a no-op with Transformer Engine's or apex's fused Adam)."""
    with torch_adam_checkpoints:
        yield


def unshare_adam_steps(optimizer) -> None:
    """After a load, megatron-core 0.16 gives every torch-Adam parameter the *same* `step` tensor; Adam
    increments it in place per parameter, so the bias correction would drift. Give each its own copy."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()


_checkpoint_results_manager = None


def checkpoint_results_queue_dies_with_rank() -> None:
    """megatron-core's checkpoint writer collects write results through a queue served by a spawned
    multiprocessing Manager, created on the first save and never told when its rank dies: after a SIGKILL
    it lives on as an orphan holding the job's output pipes. Serve that queue from a Manager that dies
    with this process instead (set before the first save; megatron reuses an existing queue). It also
    ignores the stop signals, which reach the rank's whole process group: the rank saves on them, and
    needs the queue to finish that save.

    It is forked, as megatron's own checkpoint writers are: a spawned server imports the launching module
    again and then torch to unpickle the first write results, about 6-8 s of every rank's first save. A
    forked server keeps the memory pages it was forked with for as long as it lives (the run), so a long
    job calls this early, while the process is small (the trainer: before its process group and model)."""
    global _checkpoint_results_manager
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from sail_megatron.platform.process_lifetime import serve_until_parent_stops

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=mp.get_context("fork"))
    manager.start(initializer=serve_until_parent_stops, initargs=(os.getpid(),))
    _checkpoint_results_manager = manager
    filesystem_async._results_queue = manager.Queue()


def patched_originals() -> List[Tuple[str, Callable]]:
    """(name, megatron's own function) for every function replaced here, for the upgrade check."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.fusions import fused_softmax
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.tensor_parallel import random as mpu_random
    from megatron.core.transformer import utils
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    cls = distrib_optimizer.DistributedOptimizer
    gating = moe_utils.RouterGatingLinearFunction
    return [
        ("transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu", token_dispatcher.maybe_move_tensor_to_cpu),
        # Not replaced: they read the name `define_missing_te_names` defines.
        ("moe_utils.RouterGatingLinearFunction.forward", gating.forward),
        ("moe_utils.RouterGatingLinearFunction.backward", gating.backward),
        ("dist_checkpointing.filesystem_async._get_write_results_queue", filesystem_async._get_write_results_queue),
        ("tensor_parallel.random._get_cuda_rng_state", mpu_random._get_cuda_rng_state),
        ("tensor_parallel.random._set_cuda_rng_state", mpu_random._set_cuda_rng_state),
        ("transformer.utils.get_default_causal_mask", utils.get_default_causal_mask),
        ("fusions.fused_softmax.get_default_causal_mask", fused_softmax.get_default_causal_mask),
        ("DistributedOptimizer._set_main_param_and_optimizer_states", cls._set_main_param_and_optimizer_states),
        ("DistributedOptimizer.state_dict", cls.state_dict),
    ]
