"""Memory per GPU of a layout's fullest pipeline stage, from the memory model (bench/plan/model_state.py)."""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from sail_megatron.bench.plan.data import DataAssumption
from sail_megatron.bench.plan.layouts import Layout
from sail_megatron.bench.plan.model_state import (
    GIB,
    ActivationSettings,
    activation_bytes,
    ddp_bucket_size,
    loader_device_bytes,
    stage_parameters,
    state_bytes,
    vision_tiles_of_rank,
)
from sail_megatron.config.train import TrainConfig


@dataclass(frozen=True)
class Memory:
    weights: int
    grads: int
    optimizer: int
    activations: int
    loader: int
    stage: int
    """The pipeline stage with the most memory (the one reported)."""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.loader

    def split_gib(self) -> Dict[str, float]:
        return {k: getattr(self, k) / GIB for k in ("weights", "grads", "optimizer", "activations", "loader")}


class MemoryModel:
    """Memory of the busiest stage of a layout (model state memoized per sharding)."""

    def __init__(self, cfg: TrainConfig, data: DataAssumption):
        self.cfg, self.data = cfg, data
        self._state: Dict[Tuple, Any] = {}

    def _state_of(self, layout: Layout, stage: int):
        key = (
            layout.tp,
            layout.pp,
            stage,
            layout.distributed_optimizer,
            layout.dp,
            layout.ep,
            layout.etp,
            layout.vision_tp,
        )
        if key not in self._state:
            cfg = self.cfg
            self._state[key] = state_bytes(
                stage_parameters(cfg.model, layout.tp, layout.pp, stage, layout.ep, layout.etp, layout.vision_tp),
                cfg.freeze.trainable,
                cfg.precision.dtype,
                layout.distributed_optimizer,
                layout.dp,
                ddp_bucket_size(cfg.parallel.overlap_grad_reduce, layout.dp, stage),
                layout.expert_dp,
            )
        return self._state[key]

    def of(self, layout: Layout, tiles_per_row: Optional[int] = None) -> Memory:
        """tiles_per_row: the tiles of the micro-batch's rows (default: the worst case the data allows)."""
        cfg = self.cfg
        tokens = layout.micro_batch_size * cfg.data.seq_length
        per_row = self.data.worst_tiles_per_row if tiles_per_row is None else tiles_per_row
        tiles = layout.micro_batch_size * per_row
        best = None
        for stage in range(layout.pp):
            state = self._state_of(layout, stage)
            settings = ActivationSettings(
                tp=layout.tp,
                pp=layout.pp,
                etp=layout.etp,
                vision_parallel=layout.vision_parallel,
                stage=stage,
                sequence_parallel=layout.sequence_parallel,
                recompute_granularity=layout.recompute_granularity,
                recompute_method=layout.recompute_method,
                recompute_num_layers=layout.recompute_num_layers,
                recompute_vision=layout.recompute_vision,
                dtype=cfg.precision.dtype,
                trainable=tuple(cfg.freeze.trainable),
            )
            act = activation_bytes(cfg.model, settings, tokens, tiles, layout.num_microbatches)
            own_tiles = vision_tiles_of_rank(tiles, settings)
            loader = loader_device_bytes(tokens, own_tiles, cfg.model.vision.image_size, stage == 0)
            memory = Memory(state.weights, state.grads, state.optimizer, act.total, loader, stage)
            if best is None or memory.total > best.total:
                best = memory
        return best
