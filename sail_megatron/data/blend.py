"""Weighted blends of prepared datasets, written as energon metadatasets (how SAIL-VL mixes
caption, OCR and instruction data), and the join of the parts of one input prepared in shards.

A part is read only if it is a folder whose report and `.nv-meta` files are regular files (`input_files.py`),
so a FIFO or a device planted in a part cannot block the join."""

import json
import os
import stat
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import yaml

from sail_megatron.data.input_files import check_files_in, check_folder, kind_of, read_regular

_REPORT_LIMIT = 1 << 30
"""prepare_report.json lists every skipped record: large inputs can make it large, never this large."""


def write_blend(path: Union[str, Path], weights: Dict[str, float]) -> Path:
    """Write an energon MetadatasetV2 blending dataset folders (paths relative to the YAML's folder)
    by weight for the train split; its val split holds the folders' val splits, where they have one."""
    path = Path(path)
    if not weights or any(w <= 0 for w in weights.values()):
        raise ValueError(f"blend weights must be positive, got {weights}")
    for folder in weights:
        if not (path.parent / folder / ".nv-meta").is_dir():
            raise FileNotFoundError(
                f"{path.parent / folder} is not a prepared dataset (no .nv-meta); run sail-data prepare"
            )
    splits = {"train": {"blend": [{"weight": float(w), "path": str(p)} for p, w in sorted(weights.items())]}}
    # Validation reads every folder's held-out split in turn (energon concatenates them, weights unused).
    held_out = [p for p in sorted(weights) if split_samples(path.parent / p, "val")]
    if held_out:
        splits["val"] = {"blend": [{"weight": 1.0, "path": str(p)} for p in held_out]}
    doc = {"__module__": "megatron.energon", "__class__": "MetadatasetV2", "splits": splits}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def train_samples(folder: Path) -> int:
    """Samples in the train split of a prepared dataset folder, as energon counts them."""
    return split_samples(folder, "train")


def split_samples(folder: Path, part: str) -> int:
    """Samples in one split ('train', 'val', 'test') of a prepared dataset folder, as energon counts them."""
    return sum(shard.count for shard in _split_shard_infos(folder, part))


def split_shards(folder: Path, part: str) -> List[str]:
    """The shard files (relative to `folder`) energon assigned to one split of a prepared dataset folder."""
    return [shard.name for shard in _split_shard_infos(folder, part)]


def _split_shard_infos(folder: Path, part: str) -> list:
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.empty_dataset_error import EmptyDatasetError
    from megatron.energon.flavors.webdataset.metadata import WebdatasetMeta

    if not (Path(folder) / ".nv-meta").is_dir():
        raise FileNotFoundError(f"{folder} is not a prepared dataset (no .nv-meta); run sail-data prepare")
    try:
        meta = WebdatasetMeta.from_config(EPath(str(Path(folder).resolve())), split_part=part)
    except EmptyDatasetError:
        return []
    return meta.shards


def _input_shard(folder: Path) -> Optional[Tuple[Optional[str], int, int]]:
    """(input file, num_shards, shard_index) recorded by `sail-data prepare`, if any (the input file is None in
    reports older than its recording)."""
    report = Path(folder) / "prepare_report.json"
    if not report.exists():
        return None
    try:
        doc = json.loads(read_regular(report, _REPORT_LIMIT))
        shard = doc["input_shard"]
        source = shard.get("input")
        return (source if isinstance(source, str) else None), int(shard["num_shards"]), int(shard["shard_index"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def check_part(part: Path) -> None:
    """A prepared folder whose files energon and this module open are regular files (raises OSError)."""
    check_folder(part, "--parts")
    check_files_in(part, "--parts")
    meta = Path(part) / ".nv-meta"
    if not meta.is_dir():
        raise FileNotFoundError(f"{part} is not a prepared dataset (no .nv-meta); run sail-data prepare")
    check_files_in(meta, "--parts")


def check_parts_cover(parts: Sequence[Path], allow_missing: bool = False) -> List[str]:
    """Errors for parts that repeat an input shard, and (unless `allow_missing`) for input shards no part
    holds; returns warnings for those missing shards. Parts of different input files (e.g. the parquet files
    of one set, each prepared on its own) are checked per file."""
    seen: Dict[Tuple[Optional[str], int, int], Path] = {}
    for part in parts:
        shard = _input_shard(part)
        if shard is None:
            continue
        if shard in seen:
            raise ValueError(
                f"{part} and {seen[shard]} both hold input shard {shard[2]} of {shard[1]}; join each shard once"
            )
        seen[shard] = part
    warnings = []
    inputs = sorted({(src, n) for src, n, _ in seen}, key=lambda k: (k[0] or "", k[1]))
    for source, n in inputs:
        held = sorted(i for src, m, i in seen if src == source and m == n)
        missing = sorted(set(range(n)) - set(held))
        of = f" of {source}" if source and len(inputs) > 1 else ""  # which input, when there are several
        if missing and not allow_missing:
            raise ValueError(
                f"the parts hold input shards {held} of {n}{of}; shards {missing} are missing: prepare them with "
                f"--num-shards {n} --shard-index I and list them in --parts, or pass --allow-missing-parts to "
                "blend without them"
            )
        if missing:
            warnings.append(f"the parts hold input shards {held} of {n}{of}; missing {missing}")
    return warnings


def _check_blend_out(blend_path: Path, overwrite: bool) -> None:
    if not (blend_path.exists() or blend_path.is_symlink()):
        return
    try:
        mode = blend_path.stat().st_mode
    except OSError:  # a broken symbolic link: replacing it is replacing the link
        mode = stat.S_IFREG
    if stat.S_ISDIR(mode):
        raise ValueError(
            f"--out {blend_path} is a folder; --out names the blend YAML file to write, e.g. {blend_path / 'blend.yaml'}"
        )
    if not stat.S_ISREG(mode):
        raise ValueError(f"--out {blend_path} is {kind_of(mode)}; name the blend YAML file to write")
    if not overwrite:
        raise FileExistsError(f"--out {blend_path} exists; pass --overwrite to replace it")


def join_parts(
    parts: Sequence[Union[str, Path]],
    blend_path: Union[str, Path],
    overwrite: bool = False,
    allow_missing_parts: bool = False,
) -> Tuple[Dict[str, int], List[str]]:
    """Write a blend over prepared folders (e.g. the shards of one input, prepared on several machines)
    with weights equal to their train sample counts, so every sample is as likely as in one folder.

    Parts that were prepared as shards of one input must hold all its shards, unless `allow_missing_parts`.
    Returns ({path as written in the blend: train samples}, warnings about input shards no part holds)."""
    blend_path = Path(blend_path)
    parts = [Path(p) for p in parts]
    if not parts:
        raise ValueError("--parts needs at least one prepared folder")
    for part in parts:
        check_part(part)
    real = [p.resolve() for p in parts]
    dup = next((p for i, p in enumerate(parts) if real[i] in real[:i]), None)
    if dup is not None:
        raise ValueError(f"{dup} is listed twice in --parts")
    warnings = check_parts_cover(parts, allow_missing=allow_missing_parts)
    _check_blend_out(blend_path, overwrite)
    counts: Dict[str, int] = {}
    for part, full in zip(parts, real):
        n = train_samples(part)
        if n == 0:
            raise ValueError(f"{part} has no samples in its train split; prepare it with a positive train share")
        counts[os.path.relpath(full, blend_path.parent.resolve())] = n
    blend_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = blend_path.with_name(f".{blend_path.name}.partial-{os.getpid()}")
    try:
        write_blend(tmp, {k: float(v) for k, v in counts.items()})
        os.replace(tmp, blend_path)
    finally:
        tmp.unlink(missing_ok=True)
    return counts, warnings
