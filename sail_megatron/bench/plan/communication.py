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
  row's tiles x its tokens per tile (mean tiles per row). With the ViT data-parallel across the TP ranks
  (`parallel.vision_parallel: data`) the ViT has no TP collectives; the projector's outputs are
  all-gathered instead (and their gradients reduce-scattered when they train): half an all-reduce of the
  row's image tokens x the language hidden size each. On the critical path: not overlapped. Left out:
  the embedding's, the output layer's and the projector's (one or two per micro-batch, against four per
  layer), and sequence parallelism's all-gather for the weight gradients, which megatron overlaps with
  the input gradients.
- Pipeline (PP > 1): per micro-batch, each stage sends one activation and receives one gradient of
  mbs x seq_length x hidden (split over TP under sequence parallelism), on the critical path, over the
  network when the job spans nodes (the slowest boundary sets the pace).
- Expert parallel (mixture-of-experts models, EP > 1): per micro-batch, per MoE layer, an all-to-all that
  sends each token's top-k copies to their experts and one that brings them back, in the forward pass and
  again in the backward pass (and in full recomputation); each rank sends its tokens x top-k x hidden size
  (its sequence shard under sequence parallelism), (EP - 1) / EP of it to other ranks, over NVLink while
  ETP x EP ranks fit in a node and over the network otherwise. Balanced routing assumed; not overlapped.
- Data parallel: once per step, the stage's trainable parameters (its TP shard): their fp32 gradients
  (grad_reduce_in_fp32) reduce-scattered with the distributed optimizer, all-reduced without it, and with
  the distributed optimizer the updated weights all-gathered in the training dtype. Frozen parameters
  send nothing. A DP group inside one node runs over NVLink; one that spans nodes has 8 / TP of its ranks
  on each node, and a ring leaves a node once per channel, each channel on its own GPU's NIC, so it runs
  at min(NVLink, 8 / TP x the per-GPU network bandwidth). Experts' gradients and weights go the same way
  over their own group, the ranks that hold the same experts (strided by ETP x EP).
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


def expert_data_parallel_bandwidth(layout: Layout, links: Links) -> float:
    """The ranks that hold the same experts are ETP x EP apart (megatron's expert order: ETP, EP, DP)."""
    stride = layout.etp * layout.ep
    if layout.expert_dp * stride <= GPUS_PER_NODE:
        return links.intra_node
    return min(links.intra_node, max(1, GPUS_PER_NODE // stride) * links.inter_node)


def expert_parallel_bandwidth(layout: Layout, links: Links) -> float:
    return links.intra_node if layout.etp * layout.ep <= GPUS_PER_NODE else links.inter_node


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
    expert_parallel_bytes: float
    """Per micro-batch: what a rank hands to its expert all-to-alls, added up."""
    expert_parallel_s: float
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
        self._trainable: Dict[Tuple, Tuple[int, int]] = {}

    def trainable_parameters(self, layout: Layout, stage: int) -> Tuple[int, int]:
        """Trainable elements of one rank of the stage (its TP and expert shard): (dense, experts)."""
        key = (layout.tp, layout.pp, stage, layout.ep, layout.etp, layout.vision_tp)
        if key not in self._trainable:
            params = stage_parameters(self.cfg.model, *key)
            trained = [p for p in params if p.part in self.cfg.freeze.trainable]
            self._trainable[key] = (
                sum(p.numel for p in trained if not p.expert_parallel),
                sum(p.numel for p in trained if p.expert_parallel),
            )
        return self._trainable[key]

    def _language_collectives(self, layout: Layout) -> int:
        """Collectives each language layer of a stage runs per micro-batch (forward, backward when gradients
        flow through, and again when fully recomputed), summed over the stage's layers."""
        multipliers = training_multipliers(Trains.from_freeze(self.cfg.freeze))
        layers = self.cfg.model.language.num_layers // layout.pp
        per_layer = 2 + (2 if multipliers.language > 1 else 0)
        if layout.recompute_granularity == "full" and multipliers.language > 1:
            recomputed = layers
            if layout.recompute_method == "block":
                recomputed = min(layout.recompute_num_layers, layers)
            return per_layer * layers + 2 * recomputed
        return per_layer * layers  # selective recomputation runs no collective again

    def _expert_parallel(self, layout: Layout) -> float:
        """Bytes a rank hands to the stage's expert all-to-alls per micro-batch."""
        lang = self.cfg.model.language
        if not lang.is_moe or layout.ep == 1:
            return 0.0
        shard = layout.tp if layout.sequence_parallel else 1
        tokens = layout.micro_batch_size * self.cfg.data.seq_length / shard
        width = DTYPE_BYTES[self.cfg.precision.dtype]
        return self._language_collectives(layout) * tokens * lang.moe_router_topk * lang.hidden_size * width

    def _tensor_parallel(self, layout: Layout, stage: int) -> float:
        """Bytes of the stage's TP collectives per micro-batch (each an all-reduce or its equivalent)."""
        cfg, mbs = self.cfg, layout.micro_batch_size
        width = DTYPE_BYTES[cfg.precision.dtype]
        lang = cfg.model.language
        total = self._language_collectives(layout) * mbs * cfg.data.seq_length * lang.hidden_size * width
        if stage == 0 and layout.vision_parallel == "tensor":
            vision = cfg.model.vision
            trains = "vision" in cfg.freeze.trainable
            per_layer = 2 + (2 if trains else 0) + (2 if trains and layout.recompute_vision else 0)
            tokens = mbs * self.data.mean_tiles_per_row * vision.num_positions
            total += per_layer * vision.num_built_layers * tokens * vision.hidden_size * width
        elif stage == 0:  # the projector's outputs gathered (and their gradients scattered back)
            backward = any(part in cfg.freeze.trainable for part in ("vision", "projector"))
            image_tokens = mbs * self.data.mean_tiles_per_row * cfg.model.tokens_per_tile
            total += 0.5 * (1 + backward) * image_tokens * lang.hidden_size * width
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
        expert_bytes = self._expert_parallel(layout)
        expert_s = (layout.ep - 1) / layout.ep * expert_bytes / expert_parallel_bandwidth(layout, links)
        groups = (
            (layout.dp, data_parallel_bandwidth(layout, links)),
            (layout.expert_dp, expert_data_parallel_bandwidth(layout, links)),
        )
        out = []
        for stage in range(layout.pp):
            trainable = self.trainable_parameters(layout, stage)  # (dense, experts)
            gradient_bytes = parameter_bytes = gradient_s = parameter_s = 0.0
            for elements, (ranks, bandwidth) in zip(trainable, groups):
                if ranks == 1 or not elements:
                    continue
                grads = GRAD_BYTES * elements
                weights = width * elements if layout.distributed_optimizer else 0.0
                gradient_bytes += grads
                parameter_bytes += weights
                if layout.distributed_optimizer:
                    gradient_s += reduce_scatter_s(grads, ranks, bandwidth)
                else:
                    gradient_s += all_reduce_s(grads, ranks, bandwidth)
                parameter_s += reduce_scatter_s(weights, ranks, bandwidth)
            out.append(
                StageCommunication(
                    tensor_parallel_bytes=tp_bytes[stage],
                    tensor_parallel_s=all_reduce_s(tp_bytes[stage], layout.tp, links.intra_node),
                    pipeline_bytes=pipeline_bytes,
                    pipeline_s=pipeline_s,
                    expert_parallel_bytes=expert_bytes,
                    expert_parallel_s=expert_s,
                    gradient_bytes=gradient_bytes,
                    gradient_s=gradient_s,
                    parameter_bytes=parameter_bytes,
                    parameter_s=parameter_s,
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
