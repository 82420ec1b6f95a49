"""The small reductions the loop, monitor, benchmark and data balance agree through (on this rank's device)."""

from collections import Counter
from typing import List, Mapping, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from sail_megatron.platform import read_dist_env


def _tensor(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64, device=read_dist_env().device)


def sum_over_data_parallel(values: Sequence[float]) -> List[float]:
    """Element-wise sums over this rank's data-parallel group (each model replica counted once)."""
    t = _tensor(values)
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t.tolist()


def sum_counts_over_data_parallel(counts: Mapping[str, int]) -> Counter:
    """Named counts summed over this rank's data-parallel group; ranks may hold different names."""
    group = parallel_state.get_data_parallel_group()
    gathered: List = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, dict(counts), group=group)
    return sum((Counter(c) for c in gathered), Counter())


def gather_ints_over_data_parallel(values: Sequence[int]) -> List[List[int]]:
    """Every data-parallel rank's list of ints (same length on all), in data-parallel rank order."""
    group = parallel_state.get_data_parallel_group()
    t = torch.tensor(list(values), dtype=torch.int64).to(read_dist_env().device)
    ranks = dist.get_world_size(group)
    gathered = t.new_empty(ranks * t.numel())  # flat: gloo takes no [ranks, n] output
    dist.all_gather_into_tensor(gathered, t, group=group)
    return (
        gathered.view(ranks, t.numel()).cpu().tolist()
    )  # one device-to-host copy for all ranks' values, not one per rank


def sum_over_world(values: Sequence[float]) -> List[float]:
    """Element-wise sums over all ranks."""
    t = _tensor(values)
    dist.all_reduce(t)
    return t.tolist()


def max_over_world(values: Sequence[float]) -> List[float]:
    """Element-wise maxima over all ranks."""
    t = _tensor(values)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank."""
    return max_over_world([1.0 if flag else 0.0])[0] > 0
