"""FLOPs of one micro-batch of the assumed data, per pipeline stage of a layout: what the model counts (for
MFU) and what the GPUs execute (padding and recomputation included)."""

import dataclasses
from dataclasses import dataclass
from typing import List, Tuple

from sail_megatron.bench.plan.data import DataAssumption
from sail_megatron.bench.plan.layouts import Layout
from sail_megatron.config.train import TrainConfig
from sail_megatron.training.flops import FlopBreakdown, Trains, training_flops, training_multipliers


@dataclass(frozen=True)
class RowFlops:
    """Mean FLOPs of one row of the assumed data (a micro-batch of micro_batch_size 1), whole model."""

    model: FlopBreakdown
    """Model FLOPs (training/flops.py): real tokens only. What MFU is quoted on."""
    executed: FlopBreakdown
    """What the GPUs run: the language model over the whole row, padding included (a packed row's tail
    is a segment of its own; an unpacked row is one padded sequence)."""
    output_layer: float
    """Executed training FLOPs of the output layer (last stage only)."""
    output_layer_forward: float


def _mean(total: FlopBreakdown, n: int) -> FlopBreakdown:
    return FlopBreakdown(*(getattr(total, f.name) / n for f in dataclasses.fields(total)))


def row_flops(cfg: TrainConfig, data: DataAssumption, tp: int) -> RowFlops:
    trains = Trains.from_freeze(cfg.freeze)
    seq = cfg.data.seq_length
    model = executed = FlopBreakdown()
    for lengths, tiles in data.rows:
        model = model + training_flops(cfg.model, lengths, tiles, trains, tp)
        pad = seq - sum(lengths)
        segments = (lengths + [pad] if pad else lengths) if data.packed else [seq]
        executed = executed + training_flops(cfg.model, segments, tiles, trains, tp)
    n = len(data.rows)
    lang = cfg.model.language
    out_fwd = 2 * lang.hidden_size * lang.padded_vocab_size(tp) * seq
    return RowFlops(_mean(model, n), _mean(executed, n), training_multipliers(trains).language * out_fwd, out_fwd)


@dataclass(frozen=True)
class StageWork:
    """Executed FLOPs of one pipeline stage for one micro-batch, by pass."""

    forward: float
    backward: float
    """Gradients, and the forward passes recomputation runs again."""
    forward_window: float
    """Forward FLOPs of the stage's parts up to its last trainable one (in forward order): the compute its
    parameter all-gather can hide behind (a part's weights are gathered before its forward)."""
    backward_window: float
    """Backward FLOPs of the same parts: the compute its gradient reduction can hide behind (a part's
    gradients are ready once its backward has run, and the parts before it run theirs after)."""

    @property
    def total(self) -> float:
        return self.forward + self.backward


def stage_flops(cfg: TrainConfig, f: RowFlops, layout: Layout) -> Tuple[List[StageWork], float]:
    """(executed FLOPs of each pipeline stage per micro-batch, model FLOPs per micro-batch): padding and
    recomputation add work that model FLOPs do not count."""
    t = f.executed
    lang_layers = t.language - f.output_layer
    layers_fwd = t.language_linear_forward - f.output_layer_forward + t.language_attention_forward
    per_stage_layers = cfg.model.language.num_layers // layout.pp
    extra_lang = 0.0
    if layout.recompute_granularity == "full":
        share = 1.0
        if layout.recompute_method == "block":
            share = min(layout.recompute_num_layers, per_stage_layers) / per_stage_layers
        extra_lang = share * layers_fwd
    elif layout.recompute_granularity == "selective":
        extra_lang = t.language_attention_forward
    trainable = cfg.freeze.trainable
    extra_vision = t.vision_forward if (layout.recompute_vision and "vision" in trainable) else 0.0
    mbs = layout.micro_batch_size
    stages = []
    for s in range(layout.pp):
        # (forward, backward, trains) of the stage's parts in forward order.
        parts = []
        if s == 0:
            parts.append((t.vision_forward, t.vision - t.vision_forward + extra_vision, "vision" in trainable))
            parts.append((t.projector_forward, t.projector - t.projector_forward, "projector" in trainable))
        lang_fwd = layers_fwd / layout.pp
        parts.append((lang_fwd, (lang_layers + extra_lang) / layout.pp - lang_fwd, "language" in trainable))
        if s == layout.pp - 1:
            parts.append((f.output_layer_forward, f.output_layer - f.output_layer_forward, "language" in trainable))
        last = max((i for i, part in enumerate(parts) if part[2]), default=-1)
        stages.append(
            StageWork(
                forward=mbs * sum(p[0] for p in parts),
                backward=mbs * sum(p[1] for p in parts),
                forward_window=mbs * sum(p[0] for p in parts[: last + 1]),
                backward_window=mbs * sum(p[1] for p in parts[: last + 1]),
            )
        )
    return stages, mbs * f.model.total
