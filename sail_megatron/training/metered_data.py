"""The training data stream, metered: how long the step waited for data and what each micro-batch held
(real tokens, sample lengths, tiles), so throughput and MFU count real work, never padding."""

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Tuple

from sail_megatron.config import ModelConfig
from sail_megatron.data.batch import Batch
from sail_megatron.training.flops import training_flops


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
    """Training FLOPs of the consumed micro-batches (DESIGN.md section 7)."""


class MeteredData:
    """Iterates Batches from a loader of RawBatches through `materialize`, tallying as it goes."""

    def __init__(self, loader: Iterable, materialize: Callable, model: ModelConfig, trains: Tuple[bool, bool, bool]):
        self._raw: Iterator = iter(loader)
        self._materialize, self._model, self._trains = materialize, model, trains
        self.tally = DataTally()
        self.samples_consumed = 0
        """This rank's samples since the loader started (for the checkpoint's consumed-samples count)."""

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        began = time.perf_counter()
        raw = next(self._raw)
        batch = self._materialize(raw)
        t = self.tally
        t.wait_s += time.perf_counter() - began
        lengths = [end - start for _, start, end in raw.spans]
        t.micro_batches += 1
        t.samples += len(lengths)
        self.samples_consumed += len(lengths)
        t.tokens += sum(lengths)
        t.slots += raw.tokens.numel()
        t.tiles += raw.num_tiles
        t.flops += training_flops(self._model, lengths, raw.num_tiles, self._trains).total
        return batch

    def take_tally(self) -> DataTally:
        tally, self.tally = self.tally, DataTally()
        return tally
