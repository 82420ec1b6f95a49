"""Counting the bytes a training step hands to collectives, by process group: what each parallel layout
communicates, counted on whatever backend runs (gloo on the CPU moves the same tensors NCCL would).

Bytes are the message sizes in nccl-tests' sense: the tensor reduced for an all-reduce, the whole output
of an all-gather, the whole input of a reduce-scatter, the tensor of a broadcast or of a pipeline send
(counted in batch_isend_irecv: megatron's default; sends issued one by one are not counted). megatron-core
binds some collectives to module globals at import, so those globals are wrapped as well as
torch.distributed's own functions; wrapping is undone when the context ends.
"""

import contextlib
import importlib
from collections import Counter
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

# (module, attribute, which argument holds the counted tensor: its position and keyword)
_WRAPPED: List[Tuple[str, str, int, str]] = [
    ("torch.distributed", "all_reduce", 0, "tensor"),
    ("torch.distributed", "broadcast", 0, "tensor"),
    ("torch.distributed", "all_gather_into_tensor", 0, "output_tensor"),
    ("torch.distributed", "reduce_scatter_tensor", 1, "input"),
    ("torch.distributed", "_all_gather_base", 0, "output_tensor"),
    ("torch.distributed", "_reduce_scatter_base", 1, "input"),
    ("megatron.core.tensor_parallel.mappings", "dist_all_gather_func", 0, "output_tensor"),
    ("megatron.core.tensor_parallel.mappings", "dist_reduce_scatter_func", 1, "input"),
    ("megatron.core.distributed.param_and_grad_buffer", "dist_all_gather_func", 0, "output_tensor"),
    ("megatron.core.distributed.param_and_grad_buffer", "dist_reduce_scatter_func", 1, "input"),
]


def group_kind(group) -> str:
    """'tensor_parallel', 'data_parallel', 'pipeline_parallel', 'world' or 'other'."""
    if group is None or group is dist.group.WORLD:
        return "world"
    kinds = {
        "tensor_parallel": parallel_state.get_tensor_model_parallel_group(check_initialized=False),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_group(check_initialized=False),
        "data_parallel": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }
    for kind, known in kinds.items():
        if group is known:
            return kind
    if group is parallel_state.get_data_parallel_group():
        return "data_parallel"
    return "other"


class CommCounter:
    """Bytes and calls per process-group kind while `counting()` is active."""

    def __init__(self):
        self.bytes: Counter = Counter()
        self.calls: Counter = Counter()

    def _wrap(self, fn: Callable, position: int, keyword: str) -> Callable:
        def counted(*args, **kwargs):
            tensor = args[position] if len(args) > position else kwargs.get(keyword)
            group = kwargs.get("group")
            alone = group is not None and dist.get_world_size(group) == 1  # moves nothing
            kind = group_kind(group)
            if isinstance(tensor, torch.Tensor) and not alone:
                self.bytes[kind] += tensor.numel() * tensor.element_size()
                self.calls[kind] += 1
            return fn(*args, **kwargs)

        counted.__wrapped__ = fn
        return counted

    def _wrap_batch(self, fn: Callable) -> Callable:
        """Pipeline sends: P2POp insists on torch's own isend, so the batch is counted, not the op."""

        def counted(p2p_ops, *args, **kwargs):
            for op in p2p_ops:
                if op.op is dist.isend:
                    self.bytes["pipeline_parallel"] += op.tensor.numel() * op.tensor.element_size()
                    self.calls["pipeline_parallel"] += 1
            return fn(p2p_ops, *args, **kwargs)

        counted.__wrapped__ = fn
        return counted

    @contextlib.contextmanager
    def counting(self) -> Iterator["CommCounter"]:
        saved = []
        try:
            for module_name, attr, position, keyword in _WRAPPED:
                module = importlib.import_module(module_name)
                fn = getattr(module, attr, None)
                if fn is None:
                    continue
                saved.append((module, attr, fn))
                setattr(module, attr, self._wrap(fn, position, keyword))
            saved.append((dist, "batch_isend_irecv", dist.batch_isend_irecv))
            dist.batch_isend_irecv = self._wrap_batch(dist.batch_isend_irecv)
            yield self
        finally:
            for module, attr, fn in reversed(saved):
                setattr(module, attr, fn)

    def per(self, count: int) -> Dict[str, float]:
        """Bytes per kind divided by `count` (steps or micro-batches)."""
        return {kind: n / count for kind, n in sorted(self.bytes.items()) if n}
