"""energon task encoder: cooked shard samples -> tokenized, padded micro-batches with image bytes.

Runs in loader workers and never decodes pixels: grids come from the image headers, so every
sample's token and tile counts are known here. Pixels are decoded per micro-batch by the tile
decoder in the training process (DALI on the GPU). Bad samples are skipped with a log line naming
the shard and key, and counted; the counts travel with the next batch to the training process.
"""

import logging
from collections import Counter
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from megatron.energon import Cooker, SkipSample, TaskEncoder, stateless

from sail_megatron.config.data import DataConfig
from sail_megatron.data.chat_template import ChatTemplate, SkipReason
from sail_megatron.data.image_io import ImageError, read_image_size
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
    image_sample: List[int]  # index in the batch of the sample each image belongs to
    skipped: Dict[str, int] = field(default_factory=dict)  # samples skipped by the worker since its last batch
    conversions: Dict[str, int] = field(default_factory=dict)  # counted fixes (dropped rounds, truncations)

    @property
    def num_tiles(self) -> int:
        return sum(p.num_tiles for p in self.plans)


def sample_id(sample: VLSample) -> str:
    """dataset/shard/key: keys are unique only within one prepared dataset of a blend."""
    sources = getattr(sample, "__sources__", None) or ()
    if not sources:
        return str(sample.__key__)
    return f"{Path(str(sources[0].dataset_path)).name}/{sources[0].shard_name}/{sample.__key__}"


class SailVLTaskEncoder(TaskEncoder[VLSample, EncodedSample, RawBatch, RawBatch]):
    cookers = [Cooker(cook_vl_sample)]
    decoder = None  # keep image bytes encoded: decoding happens per micro-batch on the device

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, tile_size: int, tokens_per_tile: int):
        self.cfg = cfg
        self.tile_size = tile_size
        self.pad_id = tokenizer.ids.pad
        self.template = ChatTemplate(tokenizer, tokens_per_tile, cfg.system_prompt)
        self._skipped: Counter = Counter()
        self._conversions: Counter = Counter()

    def _skip(self, sample: VLSample, reason: str, detail: str):
        self._skipped[reason] += 1
        logger.warning("skipping sample %s: %s: %s", sample_id(sample), reason, detail)
        raise SkipSample()

    @stateless
    def encode_sample(self, sample: VLSample) -> EncodedSample:
        cfg = self.cfg
        if sample.kind == "malformed":
            self._skip(sample, "malformed", sample.turns[0][1])
        try:
            sizes = [read_image_size(b, max_pixels=cfg.max_pixels) for b in sample.images]
            plans = [plan_tiles(w, h, cfg.min_tiles, cfg.max_tiles, self.tile_size, cfg.use_thumbnail)
                     for w, h in sizes]
            encoded = self.template.encode(sample, sample.images, plans, cfg.seq_length)
        except ImageError as e:
            self._skip(sample, f"image_{e.reason}", str(e))
        except SkipReason as e:
            self._skip(sample, e.reason, str(e))
        except MalformedSample as e:
            self._skip(sample, "malformed", str(e))
        self._conversions.update(encoded.notes)
        encoded.key = sample_id(sample)
        return encoded

    def batch(self, samples: List[EncodedSample]) -> RawBatch:
        s = self.cfg.seq_length
        b = len(samples)
        tokens = torch.full((b, s), self.pad_id, dtype=torch.long)
        labels = torch.full((b, s), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(b, s)
        images, plans, owners = [], [], []
        for i, smp in enumerate(samples):
            n = smp.num_tokens
            tokens[i, :n], labels[i, :n], loss_mask[i, :n] = smp.tokens, smp.labels, smp.loss_mask.float()
            images += smp.images
            plans += smp.plans
            owners += [i] * len(smp.images)
        batch = RawBatch(keys=[smp.key for smp in samples], tokens=tokens, labels=labels, loss_mask=loss_mask,
                         position_ids=torch.arange(s).expand(b, s).contiguous(), images=images, plans=plans,
                         image_sample=owners, skipped=dict(self._skipped), conversions=dict(self._conversions))
        self._skipped.clear()
        self._conversions.clear()
        return batch

    def encode_batch(self, batch: RawBatch) -> RawBatch:
        return batch
