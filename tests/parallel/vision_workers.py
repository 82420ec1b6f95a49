"""Spawned workers: the vision encoder split over the tensor-parallel ranks ("tensor") or whole on each,
every rank encoding its own share of the images ("data")."""

import dataclasses
from typing import Dict, List

import torch
from megatron.core import parallel_state

from sail_megatron.config import FreezeConfig, ParallelConfig, PrecisionConfig
from sail_megatron.data.batch import Batch
from sail_megatron.data.synthetic import IMG_CONTEXT
from sail_megatron.data.vision_share import VisionShare
from sail_megatron.model.build import build_model
from sail_megatron.model.presets import get_preset
from sail_megatron.platform import destroy_distributed, init_distributed
from sail_megatron.training.checkpoint import load_checkpoint, save_checkpoint
from sail_megatron.training.freezing import apply_freezing
from sail_megatron.training.optimizer import OptimConfig, setup_training
from sail_megatron.training.step import train_step
from tests.helpers.schedules import steps_schedule
from tests.parallel.workers import MBS, SEQ, _data

TEXT_TOKEN = 5  # replaces <IMG_CONTEXT> in the text-only micro-batches


def _model(preset: str, parallel: ParallelConfig):
    cfg = get_preset(preset)
    cfg.vision.drop_path_rate = 0.0  # drop path draws per tile; the layouts draw for different tiles
    cfg.image_context_token_id = IMG_CONTEXT
    return cfg, build_model(cfg, parallel, PrecisionConfig(dtype="fp32"))


def _as_layout(batch: Batch, layout: str, tokens_per_tile: int, text_only: bool) -> Batch:
    """The micro-batch as the loader hands it to this rank: text-only ones without tiles; under "data"
    only this rank's share of the images (one image per sample here), with the share."""
    if text_only:
        tokens = batch.tokens.masked_fill(batch.tokens == IMG_CONTEXT, TEXT_TOKEN)
        empty = batch.pixel_values[:0]
        return dataclasses.replace(batch, tokens=tokens, pixel_values=empty, tile_count=0)
    tiles = ((batch.tokens == IMG_CONTEXT).sum(dim=1) // tokens_per_tile).tolist()
    if layout == "tensor":
        return batch
    ranks = parallel_state.get_tensor_model_parallel_world_size()
    share = VisionShare.of(tiles, ranks, tokens_per_tile)
    starts = [sum(tiles[:i]) for i in range(len(tiles))]
    mine = share.images_of(parallel_state.get_tensor_model_parallel_rank())
    pixels = [batch.pixel_values[starts[i] : starts[i] + tiles[i]] for i in mine]
    own = torch.cat(pixels) if pixels else batch.pixel_values[:0]
    return dataclasses.replace(batch, pixel_values=own, tile_count=sum(tiles), vision_share=share)


def train_losses(layout: str, preset: str, trainable: List[str], tp: int, pp: int, steps: int) -> Dict:
    """Losses of `steps` steps of 2 micro-batches, every third micro-batch text-only."""
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, vision_parallel=layout)
    init_distributed(parallel, seed=1234)
    try:
        cfg, model = _model(preset, parallel)
        apply_freezing(model, FreezeConfig(trainable=trainable))
        optim = OptimConfig(lr=1e-3, warmup_steps=0, decay_steps=100)
        chunks, optimizer, scheduler = setup_training(
            model, optim, parallel, PrecisionConfig(dtype="fp32"), steps_schedule(optim)
        )
        source = _data(cfg).micro_batches(0, 1, 2)
        data = (_as_layout(b, layout, cfg.tokens_per_tile, i % 3 == 2) for i, b in enumerate(source))
        results = [train_step(chunks, optimizer, scheduler, data, 2, SEQ, MBS) for _ in range(steps)]
        return {"losses": [r.loss for r in results], "grad_norms": [r.grad_norm for r in results]}
    finally:
        destroy_distributed()


def checkpoint_round_trip(directory: str) -> Dict:
    """tensor-layout weights -> saved -> loaded into the data layout -> saved -> loaded into the tensor
    layout again: every weight bitwise equal, and the data layout's vision weights whole."""
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    init_distributed(parallel, seed=1234)
    try:
        _, tensor_model = _model("tiny", parallel)
        with torch.no_grad():
            for p in tensor_model.parameters():  # away from the initial values every build shares
                p.add_(torch.randn_like(p) * 0.01)
        save_checkpoint(f"{directory}/a", 1, [tensor_model])
        _, data_model = _model("tiny", dataclasses.replace(parallel, vision_parallel="data"))
        load_checkpoint(f"{directory}/a", [data_model])
        save_checkpoint(f"{directory}/b", 1, [data_model])
        _, back = _model("tiny", parallel)
        load_checkpoint(f"{directory}/b", [back])
        expected = dict(tensor_model.named_parameters())
        differing = [n for n, p in back.named_parameters() if not torch.equal(p, expected[n])]
        qkv = dict(data_model.named_parameters())["vision_model.decoder.layers.0.self_attention.linear_qkv.weight"]
        return {"differing": differing, "vision_qkv_rows": qkv.shape[0]}
    finally:
        destroy_distributed()
