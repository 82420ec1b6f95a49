"""Turns a loader micro-batch (text + encoded images) into the model's Batch on the device.

The decoder is chosen once ('dali': device 'mixed' with CUDA, 'cpu' otherwise; 'pil': the reference).
An image that still fails to decode here (the workers only read headers) costs its sample's loss,
never the step: its tiles become zeros, the sample's loss mask is cleared, and it is counted and logged.

Only the first pipeline stage runs the vision encoder, so only it decodes: a materializer built with
`decode_images=False` yields the text side and the tile count alone. Such a stage cannot see a late decode
failure, so under pipeline parallelism the last stage (where the loss is taken) keeps that sample's loss:
it trains against zero tiles, and only the first stage counts and logs the failure.
"""

import importlib.util
import logging
from collections import Counter
from typing import Callable, List, Optional, Tuple

import torch

from sail_megatron.config.data import DEFAULT_MAX_PIXELS
from sail_megatron.data.batch import Batch
from sail_megatron.data.decode_pil import PilTileDecoder
from sail_megatron.data.image_io import ImageError
from sail_megatron.data.task_encoder import RawBatch
from sail_megatron.data.tiling import TilePlan
from sail_megatron.data.vision_share import VisionShare

logger = logging.getLogger(__name__)

TileDecoder = Callable[[List[bytes], List[TilePlan], int], torch.Tensor]


def build_tile_decoder(
    kind: str, device: torch.device, dtype: torch.dtype = torch.float32, max_pixels: int = DEFAULT_MAX_PIXELS
) -> TileDecoder:
    """max_pixels: the same limit the loader applied to the image headers (`data.max_pixels`)."""
    if kind == "auto":
        kind = "dali" if importlib.util.find_spec("nvidia.dali") is not None else "pil"
    if kind == "dali":
        from sail_megatron.data.decode_dali import DaliTileDecoder

        return DaliTileDecoder(device, dtype=dtype, max_pixels=max_pixels)
    if kind == "pil":
        pil = PilTileDecoder(max_pixels)
        return lambda images, plans, tile_size: pil(images, plans, tile_size).to(device, dtype)
    raise ValueError(f"unknown tile decoder {kind!r}: use 'dali', 'pil' or 'auto'")


class BatchMaterializer:
    """RawBatch -> Batch, keeping the running counts of skipped and converted samples."""

    def __init__(
        self,
        decoder: TileDecoder,
        tile_size: int,
        device: torch.device,
        tokens_per_tile: Optional[int] = None,
        image_token_id: Optional[int] = None,
        decode_images: bool = True,
        vision_rank: Optional[Tuple[int, int]] = None,
    ):
        """vision_rank: (rank, ranks) of this process among the tensor-parallel ranks that share the
        micro-batch's images (parallel.vision_parallel=data): it decodes only its own share."""
        self.decoder, self.tile_size, self.device = decoder, tile_size, torch.device(device)
        self.vision_rank = vision_rank
        self.tokens_per_tile, self.image_token_id = tokens_per_tile, image_token_id
        self.decode_images = decode_images
        self.skipped: Counter = Counter()
        self.conversions: Counter = Counter()

    def _decode_each(self, raw: RawBatch, loss_mask: torch.Tensor, images: List[int]) -> torch.Tensor:
        """Slow path after a batch-level failure: decode image by image to isolate the bad ones."""
        parts = []
        for i in images:
            image, plan, owner = raw.images[i], raw.plans[i], raw.image_sample[i]
            try:
                parts.append(self.decoder([image], [plan], self.tile_size))
            except (ImageError, RuntimeError, OSError, ValueError) as e:
                self.skipped["decode_failed"] += 1
                logger.warning("image of sample %s failed to decode (%s); its loss is masked", raw.keys[owner], e)
                row, start, end = raw.spans[owner]  # only that sample's span: a packed row holds others
                loss_mask[row, start:end] = 0.0
                parts.append(torch.zeros(plan.num_tiles, 3, self.tile_size, self.tile_size, device=self.device))
        return torch.cat(parts)

    def _check_expansion(self, raw: RawBatch) -> None:
        """Tiles and image tokens must agree; checked here on host tensors so the model need not sync."""
        if self.image_token_id is None:
            return
        slots = int((raw.tokens == self.image_token_id).sum())
        if slots != raw.num_tiles * self.tokens_per_tile:
            raise ValueError(
                f"the text and the tile plan disagree in {'; '.join(self._disagreements(raw))} "
                f"(batch {raw.keys}: {slots} image tokens for {raw.num_tiles} tiles x "
                f"{self.tokens_per_tile} tokens): the text holds image-context tokens outside its "
                "image blocks, or the task encoder and the model use different tokens_per_tile"
            )

    def _disagreements(self, raw: RawBatch) -> List[str]:
        """'sample KEY (n image tokens, tiles x tokens_per_tile expected)' for each sample whose counts differ."""
        if len(raw.spans) != len(raw.keys):  # no per-sample spans: name the whole batch
            return [f"samples {', '.join(raw.keys)}"]
        tiles = [0] * len(raw.keys)
        for plan, owner in zip(raw.plans, raw.image_sample):
            tiles[owner] += plan.num_tiles
        found = []
        for key, (row, start, end), n in zip(raw.keys, raw.spans, tiles):
            slots = int((raw.tokens[row, start:end] == self.image_token_id).sum())
            if slots != n * self.tokens_per_tile:
                found.append(f"sample {key} ({slots} image tokens, {n} tiles x {self.tokens_per_tile} expected)")
        return found or [f"samples {', '.join(raw.keys)}"]  # only padding outside the spans differs

    def __call__(self, raw: RawBatch) -> Batch:
        self._check_expansion(raw)
        self.skipped.update(raw.skipped)
        self.conversions.update(raw.conversions)
        # A copy (decode failures zero their spans), page-locked when the loader pinned the original.
        src = raw.loss_mask
        loss_mask = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_pinned()).copy_(src)
        share = None
        if self.vision_rank is not None and raw.plans:
            tiles = [plan.num_tiles for plan in raw.plans]
            share = VisionShare.of(tiles, self.vision_rank[1], self.tokens_per_tile, pin=self.device.type == "cuda")
        images = share.images_of(self.vision_rank[0]) if share is not None else list(range(len(raw.plans)))
        pixels = self._decode(raw, loss_mask, images) if self.decode_images else None
        return Batch(
            tokens=raw.tokens,
            labels=raw.labels,
            loss_mask=loss_mask,
            position_ids=raw.position_ids,
            pixel_values=pixels,
            cu_seqlens=raw.cu_seqlens,
            max_seqlen=raw.max_seqlen,
            tile_count=raw.num_tiles,
            image_count=len(raw.plans),
            decoded_images=len(images) if self.decode_images else 0,
            vision_share=share,
        ).to(self.device)

    def _decode(self, raw: RawBatch, loss_mask: torch.Tensor, images: List[int]) -> torch.Tensor:
        if not images:
            return torch.zeros(0, 3, self.tile_size, self.tile_size, device=self.device)
        try:
            return self.decoder([raw.images[i] for i in images], [raw.plans[i] for i in images], self.tile_size)
        except (ImageError, RuntimeError, OSError, ValueError):
            return self._decode_each(raw, loss_mask, images)
