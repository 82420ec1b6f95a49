"""A cheap look at `data.path` before any process group or model exists, so a wrong path costs seconds."""

from pathlib import Path

import yaml

from sail_megatron.config import ConfigError


def check_dataset_path(path: str) -> None:
    """An energon dataset folder (prepared: `.nv-meta/`) or a blend YAML (an energon metadataset)."""
    p = Path(path)
    fix = "point data.path at a folder made by `sail-data prepare` or at a blend YAML of such folders"
    if not p.exists():
        raise ConfigError("data.path", f"{p} does not exist", fix)
    if p.is_dir():
        if not (p / ".nv-meta").is_dir():
            raise ConfigError("data.path", f"{p} is not a prepared dataset (no .nv-meta folder)", fix)
        return
    try:
        blend = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError("data.path", f"{p} is neither a dataset folder nor a blend YAML ({reason})", fix) from None
    if not isinstance(blend, dict) or "splits" not in blend:
        raise ConfigError("data.path", f"{p} is not a blend: an energon metadataset YAML has a 'splits' section", fix)
