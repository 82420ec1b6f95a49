"""Builds this process's pipeline stage of a SAIL-VL model from configs."""

import logging
from typing import Optional

from megatron.core import parallel_state
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from sail_megatron.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig
from sail_megatron.model.sail_vl import SailVLModel
from sail_megatron.model.specs import build_specs
from sail_megatron.model.transformer_configs import build_part_configs
from sail_megatron.model.vision_buckets import BucketedTiles, DynamicTiles
from sail_megatron.model.vision_graphs import GraphedTiles
from sail_megatron.model.vision_layout import vision_layout
from sail_megatron.platform.backends import log_backends_once

logger = logging.getLogger(__name__)


def tile_runner(precision: PrecisionConfig, max_tiles: Optional[int] = None) -> DynamicTiles:
    """How the ViT is called on a micro-batch's tiles (model/vision_buckets.py): at their own count, padded
    to static tile buckets, or as one CUDA graph per bucket. max_tiles: the most tiles one ViT call gets
    (data.micro_batch_size x data.max_tiles_per_pack), where the 'pow2' buckets end."""
    buckets = precision.tile_buckets(max_tiles)
    if buckets is None:
        return DynamicTiles()
    return GraphedTiles(buckets) if precision.vision_cuda_graphs else BucketedTiles(buckets)


def build_model(
    model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, max_tiles: Optional[int] = None
) -> SailVLModel:
    """The stage of the model that this rank holds; needs megatron-core's parallel state. max_tiles: the
    most tiles one ViT call gets (data.micro_batch_size x data.max_tiles_per_pack; needed by
    precision.vision_tile_buckets=pow2)."""
    backends = log_backends_once()
    model.validate()
    if model.image_context_token_id is None:
        raise ConfigError(
            "model.image_context_token_id",
            "is not set",
            "set it from the tokenizer's <IMG_CONTEXT> id before building the model",
        )
    layer_backend = precision.layer_backend(backends)
    # Checked again here, where the backends are known: callers that build without TrainConfig.validate.
    parallel.check_layer_backend(layer_backend)
    precision.check_cuda_capability(backends.cuda_capability)
    precision.check_vision_graphs(backends.cuda)
    precision.check_vision_layout(parallel, max_tiles)
    configs = build_part_configs(model, parallel, precision, backends)
    specs = build_specs(layer_backend, model, get_num_layers_to_build(configs.language))
    stage = SailVLModel(
        model,
        configs,
        specs,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        vision_layout=vision_layout(parallel.vision_parallel, model.tokens_per_tile),
        tile_runner=tile_runner(precision, max_tiles),
    )
    # Every weight in the training dtype, as Megatron-LM's Float16Module does: torch-backed norms ignore
    # params_dtype, and megatron's distributed optimizer assumes one dtype per buffer (mixed fp32/bf16
    # weights put their fp32 main copies out of order, and the checkpoint save fails).
    return stage.to(precision.torch_dtype)
