"""Measured tokens and tiles per sample of a prepared dataset or a blend: what turns a stage's budget in
samples into tokens, and so into GPU-hours.

`sail-data prepare --recipe R` encodes every record it writes with the trainer's own task encoder
(`trainer_rules.py`) and sums, per split, the samples, their tokens (what the language model runs on: text
and image tokens, image blocks expanded, after the over-length policy), the image tokens among them (tiles x
tokens per tile) and their tiles. The sums go to the `token_statistics` section of prepare_report.json. They
are running sums, one small tally per shard until energon has assigned the shards to splits: memory does not
grow with the number of records. Without a recipe the text is not tokenized and nothing is measured (the
section is null). `sail-data index --recipe R` writes the same section into index_report.json, summed over the
records it checked (all of them with `--check all`): their means estimate those of the whole set, which is
what the readers below use.

`token_statistics(path)` reads them back for a prepared folder (its train split: what training draws) or a
blend YAML. For a blend it is the mean over its datasets weighted by the chance that a drawn sample comes
from each (energon's sampling: `blend` weights, normalized per level of nested blends; `blend_epochized`
repetitions x the dataset's samples). A blend `sail-data join` wrote weighs its parts by their train
samples, so its means are those of all the parts' samples pooled: the join needs no statistics of its own.
Datasets prepared without a recipe have none: the result covers the others and names them (`unmeasured`),
and is None when no dataset has any.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import yaml

from sail_megatron.data.dataset_path import _read_blend, check_dataset_path
from sail_megatron.data.input_files import read_regular

SECTION = "token_statistics"
REPORT_NAME = "prepare_report.json"  # prepare.py's report (prepare imports this module, not the reverse)
INDEX_REPORT_NAME = "index_report.json"  # index.py's: its sums are over the records it checked (their means hold)
_REPORT_LIMIT = 1 << 30  # as blend.py: the report lists every skipped record, never this many
_MAX_NESTING = 16
NO_RECIPE_FIX = (
    "re-run `sail-data prepare` with --recipe (the training recipe: its tokenizer, template and tiling) "
    "to measure tokens per sample"
)


@dataclass(frozen=True)
class SampleMeasure:
    """One sample as the trainer's task encoder makes it."""

    tokens: int  # the sequence the language model runs on: text + image tokens
    image_tokens: int  # image context tokens among them (tiles x tokens per tile)
    tiles: int


@dataclass
class TokenTally:
    """Running sums over measured samples."""

    samples: int = 0
    tokens: int = 0
    image_tokens: int = 0
    tiles: int = 0

    def add(self, m: SampleMeasure) -> None:
        self.samples += 1
        self.tokens += m.tokens
        self.image_tokens += m.image_tokens
        self.tiles += m.tiles

    def merge(self, other: "TokenTally") -> None:
        self.samples += other.samples
        self.tokens += other.tokens
        self.image_tokens += other.image_tokens
        self.tiles += other.tiles

    def as_report(self) -> dict:
        n = max(self.samples, 1)
        return {
            "samples": self.samples,
            "tokens": self.tokens,
            "image_tokens": self.image_tokens,
            "tiles": self.tiles,
            "mean_tokens_per_sample": self.tokens / n,
            "mean_image_tokens_per_sample": self.image_tokens / n,
            "mean_tiles_per_sample": self.tiles / n,
        }

    @classmethod
    def from_report(cls, doc: dict) -> "TokenTally":
        tally = cls(*(int(doc[k]) for k in ("samples", "tokens", "image_tokens", "tiles")))
        if tally.samples < 1 or min(tally.tokens, tally.image_tokens, tally.tiles) < 0:
            raise ValueError(f"sums out of range: {tally}")
        return tally


def report_section(by_split: Dict[str, TokenTally], measured_with: str) -> dict:
    """prepare_report.json's `token_statistics`: the sums over every written sample, and per split."""
    total = TokenTally()
    for tally in by_split.values():
        total.merge(tally)
    splits = {part: tally.as_report() for part, tally in by_split.items() if tally.samples}
    return {"measured_with": measured_with, **total.as_report(), "splits": splits}


@dataclass(frozen=True)
class TokenStatistics:
    """Mean tokens and tiles per sample of what training draws from a prepared folder or a blend.

    For a blend, the means are weighted by the blend's sampling weights over the datasets that were
    measured; `unmeasured` names the others (prepared without a recipe), `weight_measured` is the share of
    the sampling weight the means cover (1.0 when complete)."""

    mean_tokens_per_sample: float  # text + image tokens, as the trainer encodes them
    mean_image_tokens_per_sample: float
    mean_tiles_per_sample: float
    samples_measured: int  # in the split read, over the measured datasets
    source: str  # what measured them: the recipe (its seq_length and tiling) given to `sail-data prepare`
    datasets: int = 1
    datasets_measured: int = 1
    weight_measured: float = 1.0
    unmeasured: Tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.unmeasured

    def coverage(self) -> str:
        """'measured on 3 of 4 datasets (92.5 % of the sampling weight)'."""
        text = f"measured on {self.datasets_measured} of {self.datasets} dataset{'s' * (self.datasets != 1)}"
        return text if self.complete else f"{text} ({100 * self.weight_measured:.1f} % of the sampling weight)"

    def tokens_for(self, samples: int) -> int:
        """Tokens that `samples` drawn samples hold, at the measured mean."""
        return round(samples * self.mean_tokens_per_sample)


def folder_tally(folder: Union[str, Path], split: str = "train") -> Optional[Tuple[TokenTally, str]]:
    """(the sums over `split`, what measured them) from a prepared folder's report; None when it was
    prepared without a recipe (or has no report). ValueError for a report that cannot be read, or a split
    that holds no samples."""
    report = Path(folder) / REPORT_NAME
    if not report.exists():
        report = Path(folder) / INDEX_REPORT_NAME  # shards indexed where they lie (`sail-data index`)
    if not report.exists():
        return None
    try:
        section = json.loads(read_regular(report, _REPORT_LIMIT)).get(SECTION)
        if section is None:
            return None
        splits, source = section["splits"], str(section["measured_with"])
        tally = TokenTally.from_report(splits[split]) if split in splits else None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{report} is not readable ({e}); re-run `sail-data prepare`") from None
    except (ValueError, AttributeError, KeyError, TypeError, RecursionError) as e:
        reason = f"{type(e).__name__}: {e}"
        raise ValueError(f"{report}: no readable {SECTION} ({reason}); re-run `sail-data prepare`") from None
    if tally is None:
        raise ValueError(f"{folder} has no samples in its {split} split")
    return tally, source


def _resolve(blend: Path, entry: object, split: str) -> Tuple[Path, str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ValueError(f"{blend}: the {split} split has an entry without a path: {entry!r:.100}")
    path = blend.parent / entry["path"]
    if not path.exists():
        raise FileNotFoundError(f"{path}, named in {blend}, does not exist")
    part = entry.get("split_part", split)  # energon: a dataset reference may read another split
    return path, part if isinstance(part, str) else split


def _positive(blend: Path, entry: dict, key: str) -> float:
    value = entry.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{blend}: {key} {value!r} of {entry['path']} is not a positive number")
    return float(value)


def _dataset_shares(path: Path, split: str, depth: int = 0) -> List[Tuple[Path, str, float]]:
    """(dataset folder, its split, chance that a drawn sample comes from it) for a folder or blend YAML."""
    if path.is_dir():
        return [(path, split, 1.0)]
    if depth > _MAX_NESTING:
        raise ValueError(f"{path}: blends nested more than {_MAX_NESTING} deep (does a blend name itself?)")
    try:
        doc = yaml.safe_load(_read_blend(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable blend YAML ({reason})") from None
    splits = doc.get("splits") if isinstance(doc, dict) else None
    entry = splits.get(split) if isinstance(splits, dict) else None
    if not isinstance(entry, dict):
        raise ValueError(f"{path} has no {split} split")
    if "blend" in entry or "blend_epochized" in entry:
        epochized = "blend_epochized" in entry
        items = entry["blend_epochized" if epochized else "blend"]
        if not isinstance(items, list) or not items:
            raise ValueError(f"{path}: the {split} split's blend lists no datasets")
        weighted = []
        for item in items:
            sub, part = _resolve(path, item, split)
            if epochized:  # repetitions x samples of each dataset per epoch
                from sail_megatron.data.blend import split_samples

                if not sub.is_dir():
                    raise ValueError(f"{path}: blend_epochized entry {sub} is not a prepared folder")
                weight = _positive(path, item, "repetitions") * split_samples(sub, part)
            else:
                weight = _positive(path, item, "weight")
            weighted.append((sub, part, weight))
        total = sum(w for _, _, w in weighted)
        return [
            (folder, p, share * w / total)
            for sub, part, w in weighted
            for folder, p, share in _dataset_shares(sub, part, depth + 1)
        ]
    if "path" in entry:
        sub, part = _resolve(path, entry, split)
        return _dataset_shares(sub, part, depth + 1)
    raise ValueError(
        f"{path}: the {split} split is not a blend, blend_epochized or path of prepared datasets (a join?); "
        "token statistics are read for those"
    )


def token_statistics(path: Union[str, Path], split: str = "train") -> Optional[TokenStatistics]:
    """The measured means of what training draws from `path`: a folder `sail-data prepare` wrote or a blend
    YAML of such folders (`split`: the split read, 'train' by default).

    None when nothing was measured (prepared without --recipe, or, for a blend, none of its datasets was);
    a partial result (`complete` False, `unmeasured` naming the rest) when only some datasets were.
    Raises ValueError (a `ConfigError` for a path that is neither) or OSError for an unusable path."""
    path = Path(path)
    check_dataset_path(str(path), field="PATH")
    # One entry per dataset (and split), however often the blend names it; its shares add up.
    shares: Dict[Tuple[Path, str], float] = {}
    names: Dict[Tuple[Path, str], Path] = {}
    for folder, part, share in _dataset_shares(path, split):
        key = (folder.resolve(), part)
        names.setdefault(key, folder)
        shares[key] = shares.get(key, 0.0) + share
    measured, unmeasured, sources = [], [], []
    for key, share in shares.items():
        folder, part = names[key], key[1]
        if not (folder / ".nv-meta").is_dir():
            raise ValueError(f"{folder} (in {path}) is not a prepared dataset (no .nv-meta); run sail-data prepare")
        got = folder_tally(folder, part)
        if got is None:
            unmeasured.append(str(folder))
            continue
        tally, source = got
        measured.append((share, tally))
        if source not in sources:
            sources.append(source)
    if not measured:
        return None
    weight = sum(share for share, _ in measured)

    def mean(field: str) -> float:
        return sum(share * getattr(t, field) / t.samples for share, t in measured) / weight

    return TokenStatistics(
        mean_tokens_per_sample=mean("tokens"),
        mean_image_tokens_per_sample=mean("image_tokens"),
        mean_tiles_per_sample=mean("tiles"),
        samples_measured=sum(t.samples for _, t in measured),
        source=sources[0] if len(sources) == 1 else f"{len(sources)} recipes: " + " | ".join(sources),
        datasets=len(shares),
        datasets_measured=len(measured),
        weight_measured=weight / sum(shares.values()),
        unmeasured=tuple(unmeasured),
    )
