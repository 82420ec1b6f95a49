"""energon task encoders: cooked shard samples -> tokenized micro-batches with image bytes, either
packed (several samples per row, THD with cu_seqlens; the default) or padded (one sample per row).

Runs in loader workers and never decodes pixels: grids come from the image headers, so every
sample's token and tile counts are known here. Pixels are decoded per micro-batch by the tile
decoder in the training process (DALI on the GPU). Bad samples are skipped with a log line naming
the shard and key, and counted; the counts travel with the next batch to the training process.
"""

import dataclasses
import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from megatron.energon import Cooker, SkipSample, TaskEncoder, stateless

from sail_megatron.config.data import DataConfig
from sail_megatron.data.chat_template import ChatTemplate, SkipReason
from sail_megatron.data.image_io import ImageError, read_image_size
from sail_megatron.data.img2dataset import LAYOUT, LAYOUT_KEY, cook_img2dataset_sample
from sail_megatron.data.packing import plan_packs
from sail_megatron.data.sample import EncodedSample, MalformedSample, VLSample, cook_vl_sample
from sail_megatron.data.tiling import TilePlan, plan_tiles
from sail_megatron.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class RawBatch:
    """A micro-batch as the loader yields it: text tensors [b, s] and still-encoded images."""

    keys: List[str]
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64
    loss_mask: torch.Tensor  # [b, s] float
    position_ids: torch.Tensor  # [b, s] int64
    images: List[bytes]  # every image of every sample, in order
    plans: List[TilePlan]  # one per image
    image_sample: List[int]  # index (into keys/spans) of the sample each image belongs to
    spans: List[Tuple[int, int, int]] = field(default_factory=list)  # per sample: (row, start, end) in [b, s]
    skipped: Dict[str, int] = field(default_factory=dict)  # samples skipped by the worker since its last batch
    conversions: Dict[str, int] = field(default_factory=dict)  # counted fixes (dropped rounds, truncations)
    cu_seqlens: Optional[torch.Tensor] = None  # [n+1] int32 sample boundaries when b == 1 is a packed row
    max_seqlen: int = 0

    @property
    def num_tiles(self) -> int:
        return sum(p.num_tiles for p in self.plans)

    def pin_memory(self) -> "RawBatch":
        """Page-locked copies of the text tensors. torch's loader pin thread calls this (it pins only
        tensors and containers by itself): a copy to the GPU from pageable memory waits for the device to
        go idle, so every micro-batch would stall the host behind the previous backward."""
        pinned = {name: getattr(self, name) for name in _TEXT_TENSORS}
        pinned = {name: t.pin_memory() for name, t in pinned.items() if t is not None}
        return dataclasses.replace(self, **pinned)


_TEXT_TENSORS = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens")


def sample_id(sample: VLSample) -> str:
    """dataset/shard/key: keys are unique only within one prepared dataset of a blend."""
    sources = getattr(sample, "__sources__", None) or ()
    if not sources:
        return str(sample.__key__)
    return f"{Path(str(sources[0].dataset_path)).name}/{sources[0].shard_name}/{sample.__key__}"


@dataclass
class PackedRow:
    """The samples planned into one packed row."""

    samples: List[EncodedSample]


class _SailVLEncoding(TaskEncoder[VLSample, EncodedSample, RawBatch, RawBatch]):
    """What both encoders share: cooking, tokenizing from headers, counted skips."""

    # energon takes the first cooker whose subflavors match the dataset's: shards indexed in img2dataset's
    # layout (`sail-data index`) say so in their dataset.yaml; everything else is `sail-data prepare`'s layout.
    cookers = [Cooker(cook_img2dataset_sample, has_subflavors={LAYOUT_KEY: LAYOUT}), Cooker(cook_vl_sample)]
    decoder = None  # keep image bytes encoded: decoding happens per micro-batch on the device

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, tile_size: int, tokens_per_tile: int):
        self.cfg = cfg
        self.tile_size = tile_size
        self.pad_id = tokenizer.ids.pad
        self.template = ChatTemplate(tokenizer, tokens_per_tile, cfg.system_prompt, cfg.template)
        self._skipped: Counter = Counter()
        self._conversions: Counter = Counter()

    def _skip(self, sample: VLSample, reason: str, detail: str):
        self._skipped[reason] += 1
        logger.warning("skipping sample %s: %s: %s", sample_id(sample), reason, detail)
        raise SkipSample()

    def _encode(self, sample: VLSample) -> EncodedSample:
        cfg = self.cfg
        if sample.kind == "malformed":  # the cooker's (reason, detail)
            self._skip(sample, *sample.turns[0])
        try:
            sizes = [read_image_size(b, max_pixels=cfg.max_pixels) for b in sample.images]
            plans = [
                plan_tiles(w, h, cfg.min_tiles, cfg.max_tiles, self.tile_size, cfg.use_thumbnail) for w, h in sizes
            ]
            encoded = self.template.encode(sample, sample.images, plans, cfg.seq_length)
        except ImageError as e:
            self._skip(sample, f"image_{e.reason}", str(e))
        except SkipReason as e:
            self._skip(sample, e.reason, str(e))
        except MalformedSample as e:
            self._skip(sample, "malformed", str(e))
        if encoded.num_tiles > cfg.max_tiles_per_pack:
            self._skip(
                sample, "too_many_tiles", f"{encoded.num_tiles} tiles > max_tiles_per_pack={cfg.max_tiles_per_pack}"
            )
        self._conversions.update(encoded.notes)
        encoded.key = sample_id(sample)
        encoded.__restore_key__ = sample.__restore_key__  # energon re-creates buffered samples from it on resume
        return encoded

    def _raw_batch(self, rows: List[List[EncodedSample]]) -> RawBatch:
        """Rows of samples (one sample per row when padded, several when packed) -> RawBatch [b, s]."""
        s, b = self.cfg.seq_length, len(rows)
        tokens = torch.full((b, s), self.pad_id, dtype=torch.long)
        labels = torch.full((b, s), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(b, s)
        position_ids = torch.zeros(b, s, dtype=torch.long)
        keys, images, plans, owners, spans = [], [], [], [], []
        for i, row in enumerate(rows):
            offset = 0
            for smp in row:
                n = smp.num_tokens
                span = slice(offset, offset + n)
                tokens[i, span], labels[i, span], loss_mask[i, span] = smp.tokens, smp.labels, smp.loss_mask.float()
                position_ids[i, span] = torch.arange(n)  # RoPE restarts at every sample
                owners += [len(keys)] * len(smp.images)
                keys.append(smp.key)
                spans.append((i, offset, offset + n))
                images += smp.images
                plans += smp.plans
                offset += n
            position_ids[i, offset:] = torch.arange(s - offset)
        batch = RawBatch(
            keys=keys,
            tokens=tokens,
            labels=labels,
            loss_mask=loss_mask,
            position_ids=position_ids,
            images=images,
            plans=plans,
            image_sample=owners,
            spans=spans,
            skipped=dict(self._skipped),
            conversions=dict(self._conversions),
        )
        self._skipped.clear()
        self._conversions.clear()
        return batch

    def encode_batch(self, batch: RawBatch) -> RawBatch:
        return batch


class PaddedTaskEncoder(_SailVLEncoding):
    """One sample per row, padded to seq_length (the baseline packing is measured against)."""

    @stateless
    def encode_sample(self, sample: VLSample) -> EncodedSample:
        return self._encode(sample)

    def batch(self, samples: List[EncodedSample]) -> RawBatch:
        return self._raw_batch([[smp] for smp in samples])


class PackedTaskEncoder(_SailVLEncoding):
    """Several samples per row under a joint budget of seq_length tokens and max_tiles_per_pack
    tiles, planned over a buffer of samples by `plan_packs` (vision work balanced across packs)."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed

    @stateless
    def preencode_sample(self, sample: VLSample) -> EncodedSample:
        return self._encode(sample)

    def select_samples_to_pack(self, samples: List[EncodedSample]) -> List[List[EncodedSample]]:
        # The seed is a function of the buffer itself, so a resumed loader re-plans identically.
        seed = (self.seed * 1_000_003 + zlib.crc32("|".join(s.key for s in samples).encode())) % 2**31
        plan = plan_packs(
            [s.num_tokens for s in samples],
            [s.num_tiles for s in samples],
            self.cfg.seq_length,
            self.cfg.max_tiles_per_pack,
            seed=seed,
        )
        for i in plan.oversized:  # cannot happen after _encode's checks; never drop silently if it does
            self._skipped["oversized"] += 1
            logger.warning("skipping sample %s: oversized for the pack budgets", samples[i].key)
        return [[samples[i] for i in pack] for pack in plan.packs]

    @stateless
    def postencode_sample(self, sample: EncodedSample) -> EncodedSample:
        return sample

    def pack_selected_samples(self, samples: List[EncodedSample]) -> PackedRow:
        row = PackedRow(samples)
        row.__restore_key__ = ()  # energon prefixes the keys it needs to rebuild this pack on resume
        return row

    def batch(self, packs: List["PackedRow"]) -> RawBatch:
        if len(packs) != 1:
            raise ValueError(f"packed training takes one packed row per micro-batch, got {len(packs)}")
        batch = self._raw_batch([packs[0].samples])
        lengths = [smp.num_tokens for smp in packs[0].samples]
        used = sum(lengths)
        if used < self.cfg.seq_length:
            lengths.append(self.cfg.seq_length - used)  # the tail padding is a segment of its own
        batch.cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        batch.max_seqlen = max(lengths)
        return batch


def build_task_encoder(
    cfg: DataConfig, tokenizer: Tokenizer, tile_size: int, tokens_per_tile: int, seed: int = 0
) -> _SailVLEncoding:
    if cfg.packing:
        return PackedTaskEncoder(cfg, tokenizer, tile_size, tokens_per_tile, seed=seed)
    return PaddedTaskEncoder(cfg, tokenizer, tile_size, tokens_per_tile)
