"""Where the vision encoder and projector run across the tensor-parallel ranks (`parallel.vision_parallel`).

"tensor": split like the language model; every rank sees every tile. "data": whole on every rank; each
rank encodes its own share of the micro-batch's images (`data/vision_share.py` decides the shares the same
way on every rank), and the projector outputs are all-gathered so each rank merges every image's tokens
into its text. Each rank then holds the same, complete gradient of those tokens (the language model's
first layers reduce it over the tensor-parallel group), so a rank's vision gradients come from its own
images only and are summed over the tensor-parallel ranks in `finalize_model_grads`. Checkpoints do not
depend on the layout: the same tensors under the same names, only their replica marks differ.
"""

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedBase
from megatron.core.process_groups_config import ProcessGroupCollection

from sail_megatron.data.vision_share import VisionShare


class TensorParallelVision:
    """The vision side split over the tensor-parallel ranks (megatron's process groups as they are)."""

    name = "tensor"

    def groups(self) -> Optional[ProcessGroupCollection]:
        return None  # megatron's default: the model-parallel groups of parallel_state

    def prepare(self, vision: torch.nn.Module, projector: torch.nn.Module) -> None:
        pass

    def exchange(self, tokens: torch.Tensor, share: Optional[VisionShare]) -> torch.Tensor:
        return tokens

    def mark_replicas(self, sharded_state_dict: dict, prefixes) -> None:
        pass


class _GatherShares(torch.autograd.Function):
    """Every rank's vision tokens, in image order. Backward keeps this rank's rows of the (identical on
    every rank) incoming gradient, times the group size: finalize_model_grads averages the gradients of
    parameters marked `average_gradients_across_tp_domain` over the group, and the average of
    size x partial gradients is their sum (exact: tensor-parallel sizes are powers of two)."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, share: VisionShare, tokens_per_tile: int, group) -> torch.Tensor:
        ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        rows = [n * tokens_per_tile for n in share.tiles_per_rank(ranks)]
        longest = share.rows_per_rank(tokens_per_tile)
        padded = tokens.new_zeros(longest, tokens.shape[1])
        padded[: rows[rank]] = tokens
        gathered = tokens.new_empty(ranks * longest, tokens.shape[1])
        dist.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        index = share.index  # built with the batch, already on this device
        ctx.save_for_backward(index)
        ctx.rank_rows, ctx.rank, ctx.ranks, ctx.longest = rows[rank], rank, ranks, longest
        return gathered.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        mine = torch.zeros(ctx.ranks * ctx.longest, grad.shape[1], dtype=grad.dtype, device=grad.device)
        mine.index_copy_(0, index, grad)
        start = ctx.rank * ctx.longest
        return mine[start : start + ctx.rank_rows] * ctx.ranks, None, None, None


class DataParallelVision:
    """The vision side whole on every tensor-parallel rank, each encoding its own share of the images."""

    name = "data"

    def __init__(self, tokens_per_tile: int):
        self.tokens_per_tile = tokens_per_tile

    def groups(self) -> ProcessGroupCollection:
        """megatron's groups, with a tensor-parallel group of this rank alone: the vision layers are whole.
        (The context-parallel group is such a group: context parallelism is not used.)"""
        alone = parallel_state.get_context_parallel_group()
        if dist.get_world_size(alone) != 1:
            raise RuntimeError("parallel.vision_parallel=data needs context parallel size 1")
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        pgs.tp = alone
        pgs.tp_cp = alone
        return pgs

    def prepare(self, vision: torch.nn.Module, projector: torch.nn.Module) -> None:
        """Same starting weights on every tensor-parallel rank (a GPU initializes each rank's layers from
        its own RNG stream), gradients summed over them, and counted once in the gradient norm."""
        group = parallel_state.get_tensor_model_parallel_group()
        source = dist.get_global_rank(group, 0)
        for module in (vision, projector):
            for param in module.parameters():
                dist.broadcast(param.data, source, group=group)
                param.average_gradients_across_tp_domain = True
                param.tensor_model_parallel = False  # a replica: the gradient norm counts it on TP rank 0 only

    def exchange(self, tokens: torch.Tensor, share: Optional[VisionShare]) -> torch.Tensor:
        group = parallel_state.get_tensor_model_parallel_group()
        if share is None or dist.get_world_size(group) == 1:
            return tokens
        if share.index is None or share.ranks != dist.get_world_size(group):
            raise ValueError("a vision share must be built for this tensor-parallel size with tokens_per_tile")
        return _GatherShares.apply(tokens, share, self.tokens_per_tile, group)

    def mark_replicas(self, sharded_state_dict: dict, prefixes) -> None:
        """Every tensor-parallel rank holds the whole vision tensors (what the tensor layout writes as
        shards is written whole, under the same keys): the main replica is TP rank 0's of DP rank 0."""
        replica = (
            0,
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(with_context_parallel=True),
        )
        for key, item in sharded_state_dict.items():
            if isinstance(item, ShardedBase) and key.startswith(tuple(prefixes)):
                item.replica_id = replica


def vision_layout(vision_parallel: str, tokens_per_tile: int):
    return DataParallelVision(tokens_per_tile) if vision_parallel == "data" else TensorParallelVision()
