"""Freezing by stage: only the trainable parts get gradients (and so optimizer state)."""

from typing import Dict, List

import torch

from sail_megatron.config import MODEL_PARTS, FreezeConfig

# Top-level submodule of SailVLModel that holds each part, in MODEL_PARTS order.
PART_MODULES = dict(zip(MODEL_PARTS, ("vision_model", "projector", "language_model"), strict=True))


def parameters_by_part(model: torch.nn.Module) -> Dict[str, List[torch.nn.Parameter]]:
    """This stage's parameters grouped by part (a later pipeline stage has no vision or projector)."""
    groups = {}
    for part, attr in PART_MODULES.items():
        module = getattr(model, attr, None)
        groups[part] = list(module.parameters()) if module is not None else []
    return groups


def apply_freezing(model: torch.nn.Module, freeze: FreezeConfig) -> None:
    """Set requires_grad per part. Call before wrapping in DDP: megatron-core's DDP and optimizer
    only allocate gradient buffers and state for parameters that require gradients."""
    freeze.validate()
    for part, params in parameters_by_part(model).items():
        for p in params:
            p.requires_grad_(part in freeze.trainable)
