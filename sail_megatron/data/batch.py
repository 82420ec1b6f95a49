"""The micro-batch the model consumes."""

from dataclasses import dataclass, fields
from typing import Optional

import torch

from sail_megatron.data.vision_share import VisionShare


@dataclass
class Batch:
    """One micro-batch. Text is [b, s]; tiles are stacked over all images of all samples, in order."""

    tokens: torch.Tensor  # [b, s] int64 input ids, <IMG_CONTEXT> expanded per tile
    labels: torch.Tensor  # [b, s] int64 next-token targets
    loss_mask: torch.Tensor  # [b, s] float, 1 where the target is trained on
    position_ids: torch.Tensor  # [b, s] int64
    pixel_values: Optional[torch.Tensor]  # [tiles, 3, S, S] normalized float; None where no ViT runs
    cu_seqlens: Optional[torch.Tensor] = None  # [n+1] int32 sample boundaries of a packed row (b == 1)
    max_seqlen: int = 0  # longest packed sample (RoPE table length)
    tile_count: Optional[int] = None
    """Tiles of the micro-batch when pixel_values is left out (pipeline stages after the first), so FLOP
    and throughput counts stay the same on every stage."""

    image_count: Optional[int] = None
    """Images of the whole micro-batch (None: not known, e.g. synthetic rows)."""
    decoded_images: Optional[int] = None
    """Images this rank decoded for its vision encoder: its share under parallel.vision_parallel=data, all
    of them otherwise, none on later pipeline stages (None: not known)."""
    vision_share: Optional[VisionShare] = None
    """parallel.vision_parallel=data: which tensor-parallel rank encodes which image; pixel_values then hold
    this rank's images only."""

    def __post_init__(self) -> None:
        if self.pixel_values is None and self.tile_count is None:
            raise ValueError("a Batch without pixel_values needs tile_count")

    def to(self, device: torch.device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, (torch.Tensor, VisionShare)):
                moved[name] = (
                    value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value.to(device)
                )
        return Batch(**moved)

    @property
    def is_packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_tiles(self) -> int:
        """Tiles of the whole micro-batch (under a vision share, pixel_values hold only this rank's)."""
        return self.tile_count if self.tile_count is not None else self.pixel_values.shape[0]

    @staticmethod
    def collate(batches: "list[Batch]") -> "Batch":
        """Stack single-sample batches along b (tiles concatenate in sample order)."""
        if any(b.is_packed for b in batches):
            raise ValueError("packed rows are already micro-batches; they do not collate")
        if any(b.pixel_values is None for b in batches):
            raise ValueError("collate takes batches with pixel_values")
        return Batch(
            **{
                f.name: torch.cat([getattr(b, f.name) for b in batches])
                for f in fields(Batch)
                if f.name
                not in ("cu_seqlens", "max_seqlen", "tile_count", "image_count", "decoded_images", "vision_share")
            }
        )

    @staticmethod
    def pack(batches: "list[Batch]", lengths: "list[int]") -> "Batch":
        """One packed (THD) row of the first `lengths[i]` tokens of each single-sample batch; positions
        restart at every sample, tiles concatenate in sample order."""
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)

        def row(name: str) -> torch.Tensor:
            return torch.cat([getattr(b, name)[0, :n] for b, n in zip(batches, lengths)])[None]

        return Batch(
            tokens=row("tokens"),
            labels=row("labels"),
            loss_mask=row("loss_mask"),
            position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
            pixel_values=torch.cat([b.pixel_values for b in batches]),
            cu_seqlens=cu,
            max_seqlen=max(lengths),
        )
