"""What a layout sends between GPUs per training step, and how long that takes: `sail-bench plan`'s
communication model (docs/design.md, "Planning a cluster run").

Ring collectives over n ranks at a bandwidth of bw bytes/s, one direction: an all-reduce of B bytes takes
2 (n - 1) / n x B / bw, a reduce-scatter or an all-gather of a B-byte buffer (n - 1) / n x B / bw. Latency
is left out (the messages here are megabytes or more).

- Tensor parallel (TP <= 8: inside a node, over NVLink): per micro-batch, 2 collectives per transformer
  layer in the forward pass (after attention and after the MLP) and 2 in the backward pass when gradients
  flow through it, 2 more per layer that full recomputation runs again; an all-reduce each, or an
  all-gather and a reduce-scatter under sequence parallelism (the same bytes). Message: the layer's
  tokens x hidden size in the activations' dtype. The language model's layers run over the whole row
  (mbs x seq_length tokens), the ViT's (TP as the language model's, no sequence parallelism) over the
  row's tiles x its tokens per tile (mean tiles per row). On the critical path: not overlapped. Left out:
  the embedding's, the output layer's and the projector's (one or two per micro-batch, against four per
  layer), and sequence parallelism's all-gather for the weight gradients, which megatron overlaps with
  the input gradients.
- Pipeline (PP > 1): per micro-batch, each stage sends one activation and receives one gradient of
  mbs x seq_length x hidden (split over TP under sequence parallelism), on the critical path, over the
  network when the job spans nodes (the slowest boundary sets the pace).
- Data parallel: once per step, the stage's trainable parameters (its TP shard): their fp32 gradients
  (grad_reduce_in_fp32) reduce-scattered with the distributed optimizer, all-reduced without it, and with
  the distributed optimizer the updated weights all-gathered in the training dtype. Frozen parameters
  send nothing. A DP group inside one node runs over NVLink; one that spans nodes has 8 / TP of its ranks
  on each node, and a ring leaves a node once per channel, each channel on its own GPU's NIC, so it runs
  at min(NVLink, 8 / TP x the per-GPU network bandwidth).
"""

from dataclasses import dataclass
from typing import Dict, List, Tuple

from sail_megatron.bench.plan.data import DataAssumption
from sail_megatron.bench.plan.layouts import Layout
from sail_megatron.bench.plan.model_state import DTYPE_BYTES, GRAD_BYTES, stage_parameters
from sail_megatron.config.train import TrainConfig
from sail_megatron.training.flops import Trains, training_multipliers

GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Links:
    """Bandwidth in bytes/s, one direction, per GPU."""

    intra_node: float
    inter_node: float


def all_reduce_s(nbytes: float, ranks: int, bandwidth: float) -> float:
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth if ranks > 1 else 0.0


def reduce_scatter_s(nbytes: float, ranks: int, bandwidth: float) -> float:
    """A reduce-scatter of an `nbytes` buffer; an all-gather into one takes as long."""
    return (ranks - 1) / ranks * nbytes / bandwidth if ranks > 1 else 0.0


def data_parallel_bandwidth(layout: Layout, links: Links) -> float:
    """Ranks r, r + TP, r + 2 TP, ... form a DP group (megatron's order: TP innermost)."""
    if layout.dp * layout.tp <= GPUS_PER_NODE:
        return links.intra_node
    return min(links.intra_node, GPUS_PER_NODE // layout.tp * links.inter_node)


def pipeline_bandwidth(layout: Layout, links: Links) -> float:
    """Stages are blocks of TP x DP ranks: some neighbours are on different nodes when the job is."""
    return links.intra_node if layout.tp * layout.dp * layout.pp <= GPUS_PER_NODE else links.inter_node


@dataclass(frozen=True)
class StageCommunication:
    """Communication of one pipeline stage (one rank of it)."""

    tensor_parallel_bytes: float
    """Per micro-batch: the messages of its TP collectives, added up."""
    tensor_parallel_s: float
    """Per micro-batch, not overlapped."""
    pipeline_bytes: float
    pipeline_s: float
    """Per micro-batch, not overlapped."""
    gradient_bytes: float
    gradient_s: float
    """Per step: the reduce-scatter (distributed optimizer) or all-reduce of the gradients."""
    parameter_bytes: float
    parameter_s: float
    """Per step: the all-gather of the updated weights (distributed optimizer only)."""


class CommunicationModel:
    """The communication of each stage of a layout (trainable parameters memoized per sharding)."""

    def __init__(self, cfg: TrainConfig, data: DataAssumption, links: Links):
        self.cfg, self.data, self.links = cfg, data, links
        self._trainable: Dict[Tuple[int, int, int], int] = {}

    def trainable_parameters(self, tp: int, pp: int, stage: int) -> int:
        """Trainable elements of one rank of the stage (its TP shard)."""
        key = (tp, pp, stage)
        if key not in self._trainable:
            params = stage_parameters(self.cfg.model, tp, pp, stage)
            self._trainable[key] = sum(p.numel for p in params if p.part in self.cfg.freeze.trainable)
        return self._trainable[key]

    def _tensor_parallel(self, layout: Layout, stage: int) -> float:
        """Bytes of the stage's TP collectives per micro-batch (each an all-reduce or its equivalent)."""
        cfg, mbs = self.cfg, layout.micro_batch_size
        width = DTYPE_BYTES[cfg.precision.dtype]
        multipliers = training_multipliers(Trains.from_freeze(cfg.freeze))
        lang = cfg.model.language
        layers = lang.num_layers // layout.pp
        per_layer = 2 + (2 if multipliers.language > 1 else 0)  # forward; backward when gradients flow
        if layout.recompute_granularity == "full" and multipliers.language > 1:
            recomputed = layers
            if layout.recompute_method == "block":
                recomputed = min(layout.recompute_num_layers, layers)
            collectives = per_layer * layers + 2 * recomputed
        else:
            collectives = per_layer * layers  # selective recomputation runs no collective again
        total = collectives * mbs * cfg.data.seq_length * lang.hidden_size * width
        if stage == 0:
            vision = cfg.model.vision
            trains = "vision" in cfg.freeze.trainable
            per_layer = 2 + (2 if trains else 0) + (2 if trains and layout.recompute_vision else 0)
            tokens = mbs * self.data.mean_tiles_per_row * vision.num_positions
            total += per_layer * vision.num_built_layers * tokens * vision.hidden_size * width
        return total

    def of(self, layout: Layout) -> List[StageCommunication]:
        cfg, links = self.cfg, self.links
        width = DTYPE_BYTES[cfg.precision.dtype]
        tp_bytes = [self._tensor_parallel(layout, s) if layout.tp > 1 else 0.0 for s in range(layout.pp)]
        pipeline_bytes = 0.0
        if layout.pp > 1:
            transfers = 2 if training_multipliers(Trains.from_freeze(cfg.freeze)).language > 1 else 1
            shard = layout.tp if layout.sequence_parallel else 1
            activation = layout.micro_batch_size * cfg.data.seq_length * cfg.model.language.hidden_size * width
            pipeline_bytes = transfers * activation / shard
        pipeline_s = pipeline_bytes / pipeline_bandwidth(layout, links)
        dp_bandwidth = data_parallel_bandwidth(layout, links)
        out = []
        for stage in range(layout.pp):
            trainable = self.trainable_parameters(layout.tp, layout.pp, stage)
            gradient_bytes = GRAD_BYTES * trainable
            parameter_bytes = width * trainable if layout.distributed_optimizer else 0.0
            if layout.distributed_optimizer:
                gradient_s = reduce_scatter_s(gradient_bytes, layout.dp, dp_bandwidth)
            else:
                gradient_s = all_reduce_s(gradient_bytes, layout.dp, dp_bandwidth)
            out.append(
                StageCommunication(
                    tensor_parallel_bytes=tp_bytes[stage],
                    tensor_parallel_s=all_reduce_s(tp_bytes[stage], layout.tp, links.intra_node),
                    pipeline_bytes=pipeline_bytes,
                    pipeline_s=pipeline_s,
                    gradient_bytes=gradient_bytes if layout.dp > 1 else 0.0,
                    gradient_s=gradient_s,
                    parameter_bytes=parameter_bytes if layout.dp > 1 else 0.0,
                    parameter_s=reduce_scatter_s(parameter_bytes, layout.dp, dp_bandwidth),
                )
            )
        return out


OVERLAP_FRACTION = 0.8
"""Share of the compute a reduction can run behind that hides it: the last bucket has nothing left to hide
behind, and NCCL's kernels take SMs and memory bandwidth from the compute they overlap."""


def exposed_data_parallel_s(
    comm: StageCommunication, forward_window_s: float, backward_window_s: float, overlap_grad: bool, overlap_param: bool
) -> float:
    """Data-parallel time a stage adds to the step. With overlap_grad_reduce megatron reduces a bucket as
    soon as the last micro-batch's backward has filled it, so the reduction runs behind the rest of that
    backward (the `backward_window`); with overlap_param_gather the next step's forward pre-hooks wait for
    each bucket's weights, so the gather runs behind the first micro-batch's forward. Exposed: what exceeds
    OVERLAP_FRACTION of that compute; without the overlap flags, all of it."""
    grad = max(0.0, comm.gradient_s - OVERLAP_FRACTION * backward_window_s) if overlap_grad else comm.gradient_s
    param = max(0.0, comm.parameter_s - OVERLAP_FRACTION * forward_window_s) if overlap_param else comm.parameter_s
    return grad + param
