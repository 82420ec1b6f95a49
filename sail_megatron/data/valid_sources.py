"""The sources validation scores one by one: `data.valid_path` (else `data.path`) resolved into named
datasets, each read into rows of its own so that each gets a loss of its own.

- a prepared folder is one source, named by its folder name;
- a blend YAML whose val split is a plain blend (entries of `path` and `weight` only, as `sail-data blend`
  and `join` write them) gives one source per dataset of that split, nested blends followed; any other
  val split (subflavors, subsets, joins, ...) is one source, named by the YAML's file name;
- a list gives each entry's sources, in order;
- a mapping gives one source per name, a blend under a name scored as a whole (its val split read as
  energon reads it, so e.g. `{ocr: ocr_blend.yaml}` is one loss over all of its OCR datasets);
- an object-store URL (`msc://PROFILE/path`) is one source, named by its last part (a blend there is scored
  as a whole).

Names taken from paths are made unique by adding parent folders (`a/data`, `b/data`); one dataset listed
twice is an error."""

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from sail_megatron.config import ConfigError
from sail_megatron.config.data import DataConfig
from sail_megatron.data.dataset_path import _read_blend, check_dataset_path, check_valid_split
from sail_megatron.data.object_store import is_store_url, store_name

logger = logging.getLogger(__name__)

_NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_.+-]")
_MAX_NESTING = 8
_PLAIN_ENTRY = {"path", "weight"}


@dataclass(frozen=True)
class ValidSource:
    name: str
    """Its metric keys: `valid_loss/<name>` (metrics.jsonl), `loss/valid/<name>` (TensorBoard)."""
    path: str
    """What energon reads the `val` split of: a prepared folder or a blend YAML."""
    field: str
    """The config key that brought it in (`data.valid_path`, `data.valid_path[1]`, `data.valid_path.ocr`,
    `data.path`), for error messages."""
    blend: Optional[str] = None
    """The blend YAML whose val split listed it, if any."""

    def describe(self, with_path: bool = True) -> str:
        said = ([self.path] if with_path else []) + ([f"a dataset of {self.blend}'s val split"] if self.blend else [])
        return f"validation source {self.name!r}" + (f" ({', '.join(said)})" if said else "")


def configured_paths(data: DataConfig) -> List[Tuple[str, Optional[str], str]]:
    """(field, the name given or None, path) for each path the config names for validation."""
    spec = data.valid_path
    if not spec:
        return [("data.path", None, data.path)]
    if isinstance(spec, str):
        return [("data.valid_path", None, spec)]
    if isinstance(spec, list):
        return [(f"data.valid_path[{i}]", None, path) for i, path in enumerate(spec)]
    return [(f"data.valid_path.{name}", name, path) for name, path in spec.items()]


def _plain_val_entries(blend_path: Path) -> Optional[List[Path]]:
    """The datasets a blend's val split lists, if that split is a plain blend (or one plain `path`);
    None for anything else energon reads (joins, subflavors, subsets, ...) and for unreadable YAML."""
    try:
        doc = yaml.safe_load(_read_blend(blend_path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    val = (doc.get("splits") or {}).get("val") if isinstance(doc, dict) else None
    if not isinstance(val, dict):
        return None
    entries = val.get("blend") if set(val) == {"blend"} else [val] if set(val) == {"path"} else None
    if not isinstance(entries, list) or not entries:
        return None
    plain = all(isinstance(e, dict) and isinstance(e.get("path"), str) and set(e) <= _PLAIN_ENTRY for e in entries)
    if not plain:
        return None
    return [blend_path.parent / e["path"] for e in entries]


def _datasets_of(path: Path, seen: Tuple[Path, ...] = ()) -> List[Tuple[Path, Optional[Path]]]:
    """(dataset, the blend that listed it or None) for each source `path` stands for."""
    if path.is_dir() or len(seen) >= _MAX_NESTING or path.resolve() in seen:
        return [(path, None)]
    entries = _plain_val_entries(path)
    if entries is None:
        return [(path, None)]
    out = []
    for entry in entries:
        inner = _datasets_of(entry, seen + (path.resolve(),))
        out += [(dataset, blend or path) for dataset, blend in inner]
    return out


def _name_parts(path: Path) -> List[str]:
    """The path's resolved parts, last first, as name pieces (a YAML file by its stem)."""
    full = path.resolve()
    parts = [full.stem if full.is_file() else full.name] + [p.name for p in full.parents if p.name]
    return [_NOT_IN_A_NAME.sub("_", p) for p in parts]


def _unique_names(paths: Sequence[Path], fields: Sequence[str]) -> List[str]:
    """Each path's folder (or file) name, with as many parent folders as make it unique."""
    first: Dict[Path, int] = {}
    for i, full in enumerate(p.resolve() for p in paths):
        if full in first:
            raise ConfigError(
                fields[i],
                f"{full} is validated twice (also through {fields[first[full]]})",
                "list each dataset once (a blend's val split counts its datasets)",
            )
        first[full] = i
    parts = [_name_parts(p) for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(reversed(p[:d])) for p, d in zip(parts, depth)]
        groups: Dict[str, List[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        clashes = [group for group in groups.values() if len(group) > 1]
        if not clashes:
            return names
        grew = False
        for group in clashes:
            for i in group:
                if depth[i] < len(parts[i]):
                    depth[i] += 1
                    grew = True
        if not grew:  # different paths whose names differ only in characters a name cannot hold
            for group in clashes:
                for k, i in enumerate(group[1:], start=2):
                    names[i] = f"{names[i]}-{k}"
            return names


def valid_sources(data: DataConfig) -> List[ValidSource]:
    """The sources validation scores, in order: see the module's docstring."""
    sources: List[Optional[ValidSource]] = []
    unnamed: List[Tuple[int, Path, str, Optional[Path]]] = []
    for field, name, path in configured_paths(data):
        if name is not None:
            sources.append(ValidSource(name, path, field))
            continue
        if is_store_url(path):
            taken = {s.name for s in sources if s is not None}
            base = candidate = store_name(path)
            k = 1
            while candidate in taken:
                k += 1
                candidate = f"{base}-{k}"
            sources.append(ValidSource(candidate, path, field))
            continue
        for dataset, blend in _datasets_of(Path(path)):
            unnamed.append((len(sources), dataset, field, blend))
            sources.append(None)
    names = _unique_names([u[1] for u in unnamed], [u[2] for u in unnamed])
    for (i, dataset, field, blend), name in zip(unnamed, names):
        sources[i] = ValidSource(name, str(dataset), field, str(blend) if blend is not None else None)
    return sources


def check_valid_sources(data: DataConfig) -> List[ValidSource]:
    """Before training: every configured path is a prepared folder or blend, and every source's val
    split exists and holds samples (a ConfigError naming the field and the source otherwise)."""
    for field, _, path in configured_paths(data):
        check_dataset_path(path, field)
    sources = valid_sources(data)
    for source in sources:
        check_valid_split(source.path, source.field, source.describe(with_path=False))
    return sources


def datasets_left_unvalidated(data: DataConfig, sources: Sequence[ValidSource]) -> List[str]:
    """With data.valid_path unset: the datasets data.path's plain blend trains on that no source
    validates (`sail-data blend` leaves a dataset without held-out data out of the val split)."""
    if data.valid_path or is_store_url(data.path) or not Path(data.path).is_file():
        return []
    try:
        doc = yaml.safe_load(_read_blend(Path(data.path)))
        train = doc["splits"]["train"]["blend"]
        folders = [Path(data.path).parent / e["path"] for e in train]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return []
    validated = {Path(s.path).resolve() for s in sources}
    return [str(f) for f in folders if f.is_dir() and f.resolve() not in validated]
