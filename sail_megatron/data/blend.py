"""Weighted blends of prepared datasets, written as energon metadatasets (how SAIL-VL mixes
caption, OCR and instruction data)."""

from pathlib import Path
from typing import Dict, Union

import yaml


def write_blend(path: Union[str, Path], weights: Dict[str, float]) -> Path:
    """Write an energon MetadatasetV2 blending dataset folders (paths relative to the YAML's folder)
    by weight for the train split."""
    path = Path(path)
    if not weights or any(w <= 0 for w in weights.values()):
        raise ValueError(f"blend weights must be positive, got {weights}")
    for folder in weights:
        if not (path.parent / folder / ".nv-meta").is_dir():
            raise FileNotFoundError(f"{path.parent / folder} is not a prepared dataset (no .nv-meta); run sail-data prepare")
    doc = {
        "__module__": "megatron.energon",
        "__class__": "MetadatasetV2",
        "splits": {"train": {"blend": [{"weight": float(w), "path": str(p)} for p, w in sorted(weights.items())]}},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
