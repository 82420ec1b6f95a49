"""The training data stream, metered: how long the step waited for data and what each micro-batch held
(real tokens, sample lengths, tiles), so throughput and MFU count real work, never padding."""

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch.distributed as dist
from megatron.core import parallel_state

from sail_megatron.config import ModelConfig
from sail_megatron.data.batch import Batch
from sail_megatron.model.vision_buckets import vit_call_tiles
from sail_megatron.training.collectives import gather_ints_over_data_parallel
from sail_megatron.training.flops import training_flops

# A micro-batch and the lengths of the samples in it (padding excluded).
Measured = Tuple[Batch, List[int]]


def build_loader(cfg, tokenizer, device, state=None):
    """This rank's savable loader (energon's, wrapped in the cross-rank tile balance when that applies)
    and the materializer that decodes its batches on `device`. `state`: what `loader.save_state_rank()`
    returned in an earlier run."""
    from sail_megatron.data.loader import build_train_loader
    from sail_megatron.data.rank_balance import balanced_loader, split_loader_state

    model, tile = cfg.model, cfg.model.vision.image_size
    dp_size = parallel_state.get_data_parallel_world_size()
    state, balance_state = split_loader_state(state)
    loader = build_train_loader(
        cfg.data,
        tokenizer,
        tile,
        model.tokens_per_tile,
        parallel_state.get_data_parallel_rank(),
        dp_size,
        seed=cfg.run.seed,
        state=state,
    )
    if dp_size > 1 or balance_state is not None:  # rows picked so the ranks' step tiles agree (rank_balance.py)
        loader = balanced_loader(
            loader,
            cfg.num_microbatches(dist.get_world_size()),
            dp_size,
            cfg.data.balance_tiles_across_ranks,
            cfg.data.balance_lookahead,
            cfg.data.balance_max_delay,
            cfg.data.micro_batch_size * cfg.data.max_tiles_per_pack,
            gather_ints_over_data_parallel,
            state=balance_state,
        )
    return loader, build_materializer(cfg, tokenizer, device)


def build_materializer(cfg, tokenizer, device):
    """RawBatch -> Batch on `device` for this rank's pipeline stage (its own skip counts)."""
    from sail_megatron.data.decode import BatchMaterializer, build_tile_decoder

    # Every stage reads the same micro-batches (the schedules call next() on each), but only the first
    # runs the vision encoder: later stages skip decoding and the copy of the tiles to the device.
    return BatchMaterializer(
        build_tile_decoder(cfg.data.decoder, device, max_pixels=cfg.data.max_pixels),
        cfg.model.vision.image_size,
        device,
        cfg.model.tokens_per_tile,
        tokenizer.ids.img_context,
        decode_images=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        vision_rank=vision_rank(cfg.parallel),
    )


def vision_rank(parallel):
    """(rank, ranks) among the tensor-parallel ranks sharing each micro-batch's images, or None."""
    if parallel.vision_parallel != "data" or parallel.tensor_model_parallel_size == 1:
        return None
    return parallel_state.get_tensor_model_parallel_rank(), parallel.tensor_model_parallel_size


def from_loader(loader: Iterable, materialize: Callable) -> Iterator[Measured]:
    """The energon loader's RawBatches, decoded into Batches, with their samples' lengths."""
    for raw in loader:
        yield materialize(raw), [end - start for _, start, end in raw.spans]


@dataclass
class DataTally:
    """What this rank consumed since the last reset."""

    wait_s: float = 0.0
    micro_batches: int = 0
    samples: int = 0
    tokens: int = 0
    """Non-padding tokens."""
    slots: int = 0
    """Token positions, padding included (rows x seq_length)."""
    tiles: int = 0
    images: int = 0
    decoded_images: int = 0
    """Images this rank decoded and encoded (its share under parallel.vision_parallel=data)."""
    decoded_tiles: int = 0
    vit_tiles: int = 0
    """Tiles the ViT ran on this rank: its decoded ones, or the blank tile, padded to the tile bucket."""
    flops: float = 0.0
    """Training FLOPs of the consumed micro-batches (docs/design.md, Counting FLOPs)."""
    vision_flops: float = 0.0
    """The part of `flops` in the vision encoder and projector."""


class MeteredData:
    """Iterates Batches from a source of (Batch, sample lengths), tallying as it goes."""

    def __init__(
        self,
        source: Iterable[Measured],
        model: ModelConfig,
        trains: Tuple[bool, bool, bool],
        tensor_parallel_size: int = 1,
        tile_buckets: Optional[Sequence[int]] = None,
    ):
        """tile_buckets: precision.tile_buckets(...), the sizes the ViT's calls are padded to (None: none)."""
        self._source: Iterator[Measured] = iter(source)
        self._model, self._trains, self._tp = model, trains, tensor_parallel_size
        self._buckets = tile_buckets
        self.tally = DataTally()
        # Only the first pipeline stage runs the vision encoder (later stages may be handed pixels too).
        self._vision_stage = (
            not parallel_state.model_parallel_is_initialized()
            or parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        )
        self.samples_consumed = 0
        """This rank's samples since the loader started (for the checkpoint's consumed-samples count)."""

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        began = time.perf_counter()
        batch, lengths = next(self._source)
        t = self.tally
        t.wait_s += time.perf_counter() - began
        t.micro_batches += 1
        t.samples += len(lengths)
        t.tokens += sum(lengths)
        t.slots += batch.tokens.numel()
        t.tiles += batch.num_tiles
        t.images += batch.image_count or 0
        if self._vision_stage:
            t.decoded_images += batch.decoded_images or 0
            own = batch.pixel_values.shape[0] if batch.pixel_values is not None else 0
            t.decoded_tiles += own
            t.vit_tiles += vit_call_tiles(self._buckets, own)
        flops = training_flops(self._model, lengths, batch.num_tiles, self._trains, self._tp)
        t.flops += flops.total
        t.vision_flops += flops.vision + flops.projector
        self.samples_consumed += len(lengths)
        return batch

    def take_tally(self) -> DataTally:
        tally, self.tally = self.tally, DataTally()
        return tally
