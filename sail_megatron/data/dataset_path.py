"""A cheap look at `data.path` before any process group or model exists, so a wrong path costs seconds.

Blend YAMLs are read only if they are regular files of at most 16 MiB, and a prepared folder's `.nv-meta`
files must be regular files (`input_files.py`): a FIFO or a device there would block the loader forever.
An `msc://PROFILE/path` URL (an object store, through energon's EPath) is asked the same questions of the
store (`object_store.py`)."""

from pathlib import Path

import yaml

from sail_megatron.config import ConfigError
from sail_megatron.data.input_files import check_files_in, read_regular
from sail_megatron.data.object_store import check_store_path, check_store_valid_split, is_store_url

_BLEND_LIMIT = 16 << 20


def _read_blend(p: Path) -> str:
    """The text of blend YAML `p`; OSError (not a regular file, too large, unreadable) or UnicodeDecodeError."""
    return read_regular(p, _BLEND_LIMIT).decode("utf-8")


def _check_meta_files(p: Path, field: str, fix: str) -> None:
    if not (p / ".nv-meta").is_dir():
        return  # not prepared: the callers' own checks say so
    try:
        check_files_in(p / ".nv-meta")
    except OSError as e:
        raise ConfigError(field, f"{p} is not a usable prepared dataset: {e}", fix) from None


def check_dataset_path(path: str, field: str = "data.path") -> None:
    """An energon dataset folder (prepared: `.nv-meta/`) or a blend YAML (an energon metadataset), local or
    in an object store (`msc://PROFILE/path`)."""
    p = Path(path)
    fix = (
        f"point {field} at a folder made by `sail-data prepare` or indexed by `sail-data index`, or at a blend YAML "
        "of such folders"
    )
    if is_store_url(path):
        check_store_path(path, field, fix)
        return
    if not p.exists():
        raise ConfigError(field, f"{p} does not exist", fix)
    if p.is_dir():
        if not (p / ".nv-meta").is_dir():
            raise ConfigError(field, f"{p} is not a prepared dataset (no .nv-meta folder)", fix)
        _check_meta_files(p, field, fix)
        return
    try:
        blend = yaml.safe_load(_read_blend(p))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(field, f"{p} is neither a dataset folder nor a blend YAML ({reason})", fix) from None
    if not isinstance(blend, dict) or "splits" not in blend:
        raise ConfigError(field, f"{p} is not a blend: an energon metadataset YAML has a 'splits' section", fix)


VALID_SPLIT_FIX = (
    "hold some data out with `sail-data prepare --valid-fraction F`, point data.valid_path at a prepared "
    "folder or blend with a `val` split, or set run.eval_interval=0"
)


def check_valid_split(path: str, field: str, source: str = "") -> None:
    """The `val` split that validation reads from `path` (a prepared folder or a blend YAML written by
    sail-data) holds samples. Other metadatasets are left to energon. `source`: what the path is to
    validation (e.g. "validation source 'ocr' (...)"), put before the problem."""
    from sail_megatron.data.blend import split_samples

    fix = VALID_SPLIT_FIX
    p = Path(path)
    said = f"{source}: " if source else ""
    if is_store_url(path):
        check_store_valid_split(path, field, said, fix)
        return
    if not p.exists():
        raise ConfigError(field, f"{said}{p} does not exist", fix)
    if p.is_dir():
        _check_meta_files(p, field, fix)
        if not split_samples(p, "val"):
            raise ConfigError(field, f"{said}{p} has no samples in its val split", fix)
        return
    try:
        blend = yaml.safe_load(_read_blend(p))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(field, f"{said}{p} is not a readable blend YAML ({reason})", fix) from None
    if not isinstance(blend, dict) or not isinstance(blend.get("splits"), dict):
        raise ConfigError(field, f"{said}{p} is not a blend: an energon metadataset YAML has a 'splits' section", fix)
    val = blend["splits"].get("val")
    if val is None:
        raise ConfigError(field, f"{said}{p} has no val split", fix)
    entries = (val.get("blend") if isinstance(val, dict) else None) or []
    folders = [p.parent / entry["path"] for entry in entries if isinstance(entry, dict) and "path" in entry]
    local = [f for f in folders if f.is_dir()]
    for f in local:
        _check_meta_files(f, field, fix)
    if local and len(local) == len(folders) and not sum(split_samples(f, "val") for f in local):
        raise ConfigError(field, f"{said}the datasets of {p}'s val split hold no val samples", fix)
