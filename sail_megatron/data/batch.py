"""The micro-batch the model consumes."""

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """One micro-batch. Text is [b, s]; tiles are stacked over all images of all samples, in order."""

    tokens: torch.Tensor  # [b, s] int64 input ids, <IMG_CONTEXT> expanded per tile
    labels: torch.Tensor  # [b, s] int64 next-token targets
    loss_mask: torch.Tensor  # [b, s] float, 1 where the target is trained on
    position_ids: torch.Tensor  # [b, s] int64
    pixel_values: torch.Tensor  # [tiles, 3, S, S] normalized float

    def to(self, device: torch.device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]

    @staticmethod
    def collate(batches: "list[Batch]") -> "Batch":
        """Stack single-sample batches along b (tiles concatenate in sample order)."""
        return Batch(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(Batch)})
