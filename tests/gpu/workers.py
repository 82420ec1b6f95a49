"""Rank functions for the GPU-only tests."""

import math
from typing import Optional

from megatron.core import parallel_state

from sail_megatron.config import ParallelConfig, PrecisionConfig
from sail_megatron.data.synthetic import IMG_CONTEXT, SyntheticConfig, SyntheticImageCaptions
from sail_megatron.model.build import build_model
from sail_megatron.model.presets import get_preset
from sail_megatron.platform import cpu_emulation_installed, destroy_distributed, detect_backends, init_distributed
from sail_megatron.training.optimizer import OptimConfig, setup_training
from sail_megatron.training.step import train_step
from tests.helpers.schedules import steps_schedule


def train_tiny_on_gpu(fp8: Optional[str] = None, steps: int = 4) -> dict:
    parallel = ParallelConfig()
    precision = PrecisionConfig(dtype="bf16", fp8=fp8)
    backends = detect_backends()
    precision.validate(has_cuda=backends.cuda, has_te=backends.transformer_engine)
    env = init_distributed(parallel, seed=1)
    try:
        cfg = get_preset("tiny")
        cfg.image_context_token_id = IMG_CONTEXT
        model = build_model(cfg, parallel, precision)
        chunks, optimizer, scheduler = setup_training(
            model, OptimConfig(lr=1e-3), parallel, precision, steps_schedule(OptimConfig(lr=1e-3))
        )
        data = SyntheticImageCaptions(
            SyntheticConfig(
                seq_length=128,
                micro_batch_size=2,
                image_size=cfg.vision.image_size,
                tokens_per_tile=cfg.tokens_per_tile,
                vocab_size=cfg.language.vocab_size,
            )
        ).micro_batches(parallel_state.get_data_parallel_rank(), 1, 2)
        losses = [train_step(chunks, optimizer, scheduler, data, 2, 128, 2).loss for _ in range(steps)]
        return {
            "backend": env.backend,
            "emulation": cpu_emulation_installed(),
            "param_device": next(model.parameters()).device.type,
            "layer_backend": backends.layer_backend,
            "qkv_class": type(model.language_model.decoder.layers[0].self_attention.linear_qkv).__name__,
            "losses_finite": all(math.isfinite(x) for x in losses),
        }
    finally:
        destroy_distributed()
