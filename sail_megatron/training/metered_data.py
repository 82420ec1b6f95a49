"""The training data stream, metered: how long the step waited for data and what each micro-batch held
(real tokens, sample lengths, tiles), so throughput and MFU count real work, never padding."""

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Tuple

from megatron.core import parallel_state

from sail_megatron.config import ModelConfig
from sail_megatron.data.batch import Batch
from sail_megatron.training.flops import training_flops

# A micro-batch and the lengths of the samples in it (padding excluded).
Measured = Tuple[Batch, List[int]]


def build_loader(cfg, tokenizer, device, state=None):
    """This rank's savable energon loader and the materializer that decodes its batches on `device`."""
    from sail_megatron.data.decode import BatchMaterializer, build_tile_decoder
    from sail_megatron.data.loader import build_train_loader

    model, tile = cfg.model, cfg.model.vision.image_size
    loader = build_train_loader(
        cfg.data,
        tokenizer,
        tile,
        model.tokens_per_tile,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        seed=cfg.run.seed,
        state=state,
    )
    # Every stage reads the same micro-batches (the schedules call next() on each), but only the first
    # runs the vision encoder: later stages skip decoding and the copy of the tiles to the device.
    decoder = build_tile_decoder(cfg.data.decoder, device, max_pixels=cfg.data.max_pixels)
    materialize = BatchMaterializer(
        decoder,
        tile,
        device,
        model.tokens_per_tile,
        tokenizer.ids.img_context,
        decode_images=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
    )
    return loader, materialize


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
    flops: float = 0.0
    """Training FLOPs of the consumed micro-batches (docs/design.md, Counting FLOPs)."""


class MeteredData:
    """Iterates Batches from a source of (Batch, sample lengths), tallying as it goes."""

    def __init__(
        self,
        source: Iterable[Measured],
        model: ModelConfig,
        trains: Tuple[bool, bool, bool],
        tensor_parallel_size: int = 1,
    ):
        self._source: Iterator[Measured] = iter(source)
        self._model, self._trains, self._tp = model, trains, tensor_parallel_size
        self.tally = DataTally()
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
        t.flops += training_flops(self._model, lengths, batch.num_tiles, self._trains, self._tp).total
        self.samples_consumed += len(lengths)
        return batch

    def take_tally(self) -> DataTally:
        tally, self.tally = self.tally, DataTally()
        return tally
