"""`sail-data index`: WebDataset shards in img2dataset's layout made trainable where they lie, no image copied.

The source folder holds tar shards whose samples are `KEY.jpg` (or another image part, `img2dataset.py`) with
the caption in `KEY.txt` or under a key of `KEY.json`. Indexing runs energon's own preparation (the same
`energon prepare` that `sail-data prepare` runs: per-shard `.tar.idx` offsets, `.nv-meta/` with the sample
index, the shard counts and the split) and writes a `dataset.yaml` whose subflavors name the layout and
where the caption lives, so the loader cooks these samples with `cook_img2dataset_sample` (`img2dataset.py`).

Where the metadata goes:

- in place (default): `.nv-meta/`, one `SHARD.tar.idx` beside each shard and `index_report.json` are written
  into the source folder, which is then the dataset path (`data.path`, or a folder of a blend);
- `--meta DIR`, for data that must not (or cannot) be written: DIR gets one symbolic link per shard (absolute,
  to the shard in the source folder; nested folders are mirrored), the `.tar.idx` files, `.nv-meta/` and the
  report. DIR is the dataset path; nothing in the source folder is touched. energon keeps its sample index at
  `<dataset path>/.nv-meta/index.sqlite` and each shard's offsets at `<shard path>.tar.idx`, and a metadataset
  can only point at such a folder, so metadata outside the shards' folder needs a folder whose shard paths lead
  to the shards: links do, and energon reads through them. Moving DIR keeps it working; moving the source
  folder breaks the links (index again).

Checks: a sample of the records (`--check N`, default 300, spread over all shards with a fixed seed; `--check
all` for every record) goes through what `sail-data prepare` applies to each record it writes: the cooker (no
image, several images, no or empty caption), the text bound, the image header checks with `--max-pixels`
(`--verify-decode` decodes fully) and the trainer's rules (`--recipe`: too long for `seq_length`, too many
tiles, ...). Records are not removed from the shards: training skips the same records and counts them by the
same reasons. The report (`index_report.json`, printed as a summary) gives the counts by reason, the records
skipped, the share that implies for the whole set, and with `--recipe` the measured tokens and tiles per sample
(means over the checked records, per split), which `sail-data stats` and `sail-bench plan` read.

Splits are whole shards, as for `prepare`: `--valid-fraction F` holds the last shards (a share F of them, in
sorted order) out as the `val` split.
"""

import bisect
import io
import json
import logging
import os
import random
import shutil
import tarfile
from array import array
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from tqdm import tqdm

from sail_megatron.config.data import DEFAULT_MAX_PIXELS
from sail_megatron.data.blend import split_samples, split_shards
from sail_megatron.data.img2dataset import (
    CAPTION_KEY,
    IMAGE_PARTS,
    LAYOUT,
    LAYOUT_KEY,
    cook_img2dataset_sample,
    dataset_yaml,
    image_parts,
    parse_caption,
)
from sail_megatron.data.input_files import check_folder, read_regular
from sail_megatron.data.out_dir import OutputError, check_out, check_separate, staged
from sail_megatron.data.prepare import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_TEXT_CHARS,
    PrepareError,
    SkippedRecord,
    _Skip,
    _split_arguments,
    _split_flag,
    bounded_map,
    check_image,
    is_prepared_output,
    parse_split_ratio,
    run_energon_prepare,
)
from sail_megatron.data.statistics import SECTION, TokenTally, report_section
from sail_megatron.data.trainer_rules import TrainerRules

logger = logging.getLogger(__name__)

COMMAND = "sail-data index"
INDEX_REPORT = "index_report.json"
DEFAULT_CHECK = 300
"""Records checked when `--check` is not given: enough to see a bad share of a percent or more."""
_META = ".nv-meta"
_IDX = ".tar.idx"
_DETECT_SAMPLES = 32  # records of the first shard looked at to find the caption
_REPORT_LIMIT = 1 << 30


class IndexingError(PrepareError):
    """The source cannot be indexed; the message says why and what to change."""


@dataclass
class IndexReport:
    source: str
    dataset: str  # the folder to train on (data.path): the source, or --meta
    caption: str
    samples: int = 0
    shards: int = 0
    empty_shards: List[str] = field(default_factory=list)  # shards energon found no sample in (or could not read)
    checked: int = 0
    image_parts: Counter = field(default_factory=Counter)  # image parts among the checked records
    skipped: List[SkippedRecord] = field(default_factory=list)
    split_samples: Dict[str, int] = field(default_factory=dict)
    split_note: str = ""
    token_statistics: Optional[dict] = None

    def by_reason(self) -> Counter:
        return Counter(s.reason for s in self.skipped)

    @property
    def skipped_share(self) -> float:
        return len(self.skipped) / self.checked if self.checked else 0.0

    def summary(self) -> str:
        where = self.source if self.dataset == self.source else f"{self.source} (metadata in {self.dataset})"
        lines = [f"indexed {self.samples} samples in {self.shards} shards of {where}; data.path: {self.dataset}"]
        if self.split_samples and self.samples:
            parts = ", ".join(f"{p} {n} ({100 * n / self.samples:.1f} %)" for p, n in self.split_samples.items())
            lines.append(f"  splits (whole shards): {parts}")
        if self.split_note:
            lines.append(f"  note: {self.split_note}")
        kinds = ", ".join(f"{ext} {n}" for ext, n in self.image_parts.most_common()) or "none"
        lines.append(f"  layout: captions from {_caption_words(self.caption)}; images checked: {kinds}")
        if self.empty_shards:
            lines.append(
                f"  warning: {len(self.empty_shards)} shards hold no sample energon could read "
                f"(first: {self.empty_shards[0]})"
            )
        scope = "all" if self.checked == self.samples else f"a sample of {self.checked}"
        lines.append(
            f"  checked {scope}: {self.checked - len(self.skipped)} usable, {len(self.skipped)} skipped "
            f"({100 * self.skipped_share:.1f} %; training skips such records and counts them by reason)"
        )
        if self.token_statistics:
            t = self.token_statistics
            lines.append(
                f"  measured: {t['mean_tokens_per_sample']:.1f} tokens and {t['mean_tiles_per_sample']:.2f} tiles "
                f"per sample (means over {t['samples']} checked samples)"
            )
        for reason, n in sorted(self.by_reason().items()):
            estimate = "" if self.checked == self.samples else f"  (~{round(n * self.samples / self.checked)} in all)"
            lines.append(f"  skipped {n:6d} x {reason}{estimate}")
        return "\n".join(lines)


def _caption_words(caption: str) -> str:
    kind, key = parse_caption(caption)
    return "KEY.txt" if kind == "txt" else f"{key!r} of KEY.json"


# --- the shards ---------------------------------------------------------------------------------------------


def _find_shards(source: Path) -> List[str]:
    """The tar shards under `source` as energon's preparation finds them (every *.tar, nested folders too),
    relative and sorted."""
    return sorted(str(p.relative_to(source)) for p in source.rglob("*.tar") if _META not in p.parts)


def _split_name(name: str) -> Optional[Tuple[str, str]]:
    """(key, part) of a tar member as energon splits it, or None for members energon skips."""
    from megatron.energon.flavors.webdataset.config import skip_meta_re, split_name_re

    if skip_meta_re.match(name):
        return None
    m = split_name_re.match(name)
    return (m.group(1), m.group(2)) if m else None


def _entries(tar: tarfile.TarFile, limit: Optional[int] = None) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """(key, {part: bytes}) of the samples of an open tar, in order (members of a key are contiguous)."""
    key, parts, n = None, {}, 0
    for member in tar:
        if not member.isreg():
            continue
        split = _split_name(member.name)
        if split is None:
            continue
        if split[0] != key:
            if key is not None:
                yield key, parts
                n += 1
                if limit is not None and n >= limit:
                    return
            key, parts = split[0], {}
        parts[split[1]] = tar.extractfile(member).read()
    if key is not None:
        yield key, parts


def _detect_caption(source: Path, shards: Sequence[str]) -> str:
    """The caption spec of the first shard's records: txt when they have a .txt part, else json:caption."""
    seen: Counter = Counter()
    json_keys: Counter = Counter()
    for name in shards[:3]:
        try:
            with tarfile.open(source / name, "r:") as tar:
                for _, parts in _entries(tar, _DETECT_SAMPLES):
                    seen.update(list(parts))
                    if "json" in parts:
                        try:
                            doc = json.loads(parts["json"])
                            if isinstance(doc, dict):
                                json_keys.update(k for k, v in doc.items() if isinstance(v, str) and v.strip())
                        except (ValueError, RecursionError):
                            pass
        except (OSError, tarfile.TarError) as e:
            raise IndexingError(f"cannot read {source / name} to find the caption: {e}; give --caption") from None
        if seen:
            break
    if seen["txt"]:
        return "txt"
    for key in ("caption", "text", "txt", "alt", "title"):
        if json_keys[key]:
            return f"json:{key}"
    parts = ", ".join(sorted(seen)) or "none"
    keys = ", ".join(sorted(json_keys)[:12]) or "none"
    raise IndexingError(
        f"found no caption in the first records of {shards[0]} (parts: {parts}; text keys of their .json: {keys}); "
        "give --caption txt or --caption json:KEY"
    )


def _read_offsets(idx_path: Path) -> array:
    """energon's `.tar.idx`: the byte offset of each sample in the tar, then the end of the last one."""
    offsets = array("Q")
    data = read_regular(idx_path, 1 << 34)
    offsets.frombytes(data[: len(data) - len(data) % offsets.itemsize])
    return offsets


def _sample_parts(chunk: bytes) -> Tuple[str, Dict[str, bytes]]:
    """(key, {part: bytes}) of one sample's tar members (the bytes between two offsets of the index)."""
    with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
        for key, parts in _entries(tar):
            return key, parts
    return "", {}


# --- the check -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Checker:
    caption: str
    max_pixels: int
    verify_decode: bool
    rules: TrainerRules
    max_image_bytes: int
    max_text_chars: int
    text_bound: str

    def entry(self, shard: str, key: str, parts: Dict[str, bytes]) -> Union[SkippedRecord, tuple]:
        """(image part, measure) of a usable record, or why training will skip it."""
        raw = {
            "__key__": key,
            "__restore_key__": (),
            "__subflavors__": {LAYOUT_KEY: LAYOUT, CAPTION_KEY: self.caption},
            **parts,
        }
        where = f"{shard}/{key}"
        try:
            sample = cook_img2dataset_sample(raw)
            if sample.kind == "malformed":
                raise _Skip(*sample.turns[0])
            chars = len(sample.turns[0][1])
            if chars > self.max_text_chars:
                raise _Skip(
                    "text_too_long", f"{chars} characters of text, more than {self.max_text_chars} ({self.text_bound})"
                )
            (image,) = sample.images
            if len(image) > self.max_image_bytes:
                raise _Skip(
                    "image_file_too_big",
                    f"{where}: {len(image)} bytes, over {self.max_image_bytes} (--max-image-bytes)",
                )
            check_image(image, where, self.max_pixels, self.verify_decode)
            verdict = self.rules.assess_sample(sample)
            if verdict.rejection is not None:
                raise _Skip(*verdict.rejection)
        except _Skip as s:
            return SkippedRecord(where, key, s.reason, s.detail)
        return image_parts(parts)[0].lower(), verdict.measure

    def shard(self, folder: Path, shard: str, indexes: Sequence[int]) -> List[Tuple[str, Union[SkippedRecord, tuple]]]:
        """The results for records `indexes` (positions in the shard, ascending) of one shard."""
        out = []
        offsets = _read_offsets(folder / (shard[: -len(".tar")] + _IDX))
        limit = self.max_image_bytes + (32 << 20)
        with open(folder / shard, "rb") as f:
            for i in indexes:
                start, end = offsets[i], offsets[i + 1]
                where = f"{shard}/#{i}"
                if end - start > limit:
                    out.append((shard, SkippedRecord(where, None, "record_too_large", f"{end - start} bytes")))
                    continue
                f.seek(start)
                try:
                    key, parts = _sample_parts(f.read(end - start))
                except (tarfile.TarError, OSError, EOFError) as e:
                    out.append((shard, SkippedRecord(where, None, "unreadable_entry", f"{type(e).__name__}: {e}")))
                    continue
                out.append((shard, self.entry(shard, key, parts)))
        return out


def _picks(counts: Sequence[int], check: Optional[int], seed: int) -> Dict[int, List[int]]:
    """{shard position: sorted record positions} of the records to check: all (check None) or `check` of them
    drawn uniformly over every record of every shard."""
    total = sum(counts)
    if check is None or check >= total:
        return {s: list(range(n)) for s, n in enumerate(counts) if n}
    starts, acc = [], 0
    for n in counts:
        starts.append(acc)
        acc += n
    by_shard: Dict[int, List[int]] = {}
    for g in sorted(random.Random(seed).sample(range(total), check)):
        s = bisect.bisect_right(starts, g) - 1
        while counts[s] == 0:  # empty shards share their start with the next one
            s += 1
        by_shard.setdefault(s, []).append(g - starts[s])
    return by_shard


# --- where the metadata goes ----------------------------------------------------------------------------------


def _only_links_and_indexes(folder: Path, top: bool) -> bool:
    for p in folder.iterdir():
        if p.is_symlink() or p.name.endswith(_IDX):
            continue
        if top and (p.name == INDEX_REPORT and p.is_file() or p.name == _META and p.is_dir()):
            continue
        if p.is_dir() and _only_links_and_indexes(p, False):
            continue
        return False
    return True


def is_index_output(folder: Path) -> bool:
    """A `--meta` folder this module wrote: its report, and only links to shards, their indexes and .nv-meta."""
    return (folder / INDEX_REPORT).is_file() and _only_links_and_indexes(folder, top=True)


def _indexed_in_place(folder: Path) -> bool:
    """Whether `folder`'s energon metadata was written by `sail-data index` (its report says so)."""
    try:
        doc = json.loads(read_regular(folder / INDEX_REPORT, _REPORT_LIMIT))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("command") == COMMAND


def _link_shards(source: Path, shards: Sequence[str], folder: Path) -> None:
    real = Path(os.path.realpath(source))
    for name in shards:
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(real / name, link)


class _InPlace:
    """Writes into the source folder, undone on failure: the old metadata of an earlier index is kept aside
    until the new one is complete, and the `.tar.idx` files this run created are removed again."""

    def __init__(self, source: Path, shards: Sequence[str]):
        self.source = source
        self.new_idx = [n for n in shards if not (source / (n[: -len(".tar")] + _IDX)).exists()]
        self.aside: List[Tuple[Path, Path]] = []

    def __enter__(self) -> Path:
        for name in (_META, INDEX_REPORT):
            path = self.source / name
            if path.exists():
                old = self.source / f".{name.lstrip('.')}.old-{os.getpid()}"
                os.replace(path, old)
                self.aside.append((old, path))
        return self.source

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            for old, _ in self.aside:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            return
        shutil.rmtree(self.source / _META, ignore_errors=True)
        (self.source / INDEX_REPORT).unlink(missing_ok=True)
        for name in self.new_idx:
            (self.source / (name[: -len(".tar")] + _IDX)).unlink(missing_ok=True)
        for old, path in self.aside:
            os.replace(old, path)


# --- the command ------------------------------------------------------------------------------------------------


def parse_check(text: Union[str, int, None]) -> Optional[int]:
    """`--check N|all` -> N (at least 1), or None for all."""
    if text is None:
        return DEFAULT_CHECK
    if str(text).strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise IndexingError(f"--check {text!r}: give a number of records (e.g. 300) or all") from None
    if n < 1:
        raise IndexingError(f"--check must be at least 1 (or all), got {n}")
    return n


def _check_split_shards(ratio: Tuple[float, float, float], shards: int, flag: str, asked_val: bool) -> None:
    """energon gives split k the shards [int(n * cumulative share before k), int(n * cumulative share))."""
    train_end = int(shards * ratio[0] / sum(ratio))
    val_end = int(shards * (ratio[0] + ratio[1]) / sum(ratio))
    if asked_val and (train_end < 1 or val_end - train_end < 1):
        fix = (
            "index a source of two shards or more, or point data.valid_path at data held out on its own"
            if shards < 2
            else f"hold out a share between {1 / shards:.3g} (one shard) and {(shards - 1) / shards:.3g}"
        )
        raise IndexingError(
            f"{flag} holds whole shards out, and the source's {shards} shard(s) cannot give both the train and the "
            f"val split a shard; {fix}"
        )
    if train_end < 1:
        raise IndexingError(f"{flag} leaves the train split none of the source's {shards} shards; raise its share")


def _split_counts(folder: Path, report: IndexReport, ratio, flag: str) -> None:
    report.split_samples = {part: split_samples(folder, part) for part in ("train", "val", "test")}
    asked = (ratio[1] + ratio[2]) / sum(ratio)
    held = (report.split_samples["val"] + report.split_samples["test"]) / max(report.samples, 1)
    if abs(held - asked) > max(0.005, 0.1 * asked):
        report.split_note = (
            f"{flag} asked for {100 * asked:.3g} % held out, but splits are whole shards of the source, so "
            f"{100 * held:.1f} % is held out"
        )


def _write_report(folder: Path, report: IndexReport, rules: TrainerRules, check: Optional[int], seed: int) -> None:
    doc = {
        "command": COMMAND,
        "source": report.source,
        "dataset": report.dataset,
        "layout": {"name": LAYOUT, "caption": report.caption, "image_parts": list(IMAGE_PARTS)},
        "samples": report.samples,
        "shards": report.shards,
        "empty_shards": report.empty_shards,
        "split_samples": report.split_samples,
        "checked": report.checked,
        "check": {"records": "all" if check is None else check, "seed": seed},
        "checked_image_parts": dict(report.image_parts),
        "skipped_by_reason": dict(report.by_reason()),
        "estimated_skipped_share": report.skipped_share,
        "skipped": [asdict(s) for s in report.skipped],
        "trainer_rules": rules.source,
        SECTION: report.token_statistics,
    }
    (folder / INDEX_REPORT).write_text(json.dumps(doc, indent=1, sort_keys=True))


def _index_into(
    folder: Path,
    report: IndexReport,
    checker: _Checker,
    split_ratio: str,
    ratio,
    flag: str,
    check: Optional[int],
    seed: int,
    workers: int,
    progress: bool,
    name: Path,
) -> None:
    """energon's preparation of `folder` (the source, or a folder of links to its shards), then the check."""
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.metadata import get_dataset_info

    run_energon_prepare(folder, split_ratio, name=name, dataset_yaml=dataset_yaml(report.caption))
    counts = get_dataset_info(EPath(str(folder.resolve())))["shard_counts"]
    names = list(counts)
    report.shards, report.samples = len(names), sum(counts.values())
    report.empty_shards = [n for n in names if counts[n] == 0]
    if report.samples == 0:
        raise IndexingError(f"energon found no sample in the {len(names)} shards of {report.source}")
    if ratio[1] + ratio[2] > 0:
        _split_counts(folder, report, ratio, flag)
    split_of = {shard: part for part in ("train", "val", "test") for shard in split_shards(folder, part)}
    picks = _picks([counts[n] for n in names], check, seed)
    tallies: Dict[str, TokenTally] = {}
    tasks = [(names[s], indexes) for s, indexes in sorted(picks.items())]
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        results = bounded_map(pool, lambda task: checker.shard(folder, *task), tasks, 2 * workers)
        bar = tqdm(total=sum(len(i) for i in picks.values()), desc="check", unit=" records", disable=not progress)
        for shard_results in results:
            bar.update(len(shard_results))
            for shard, result in shard_results:
                report.checked += 1
                if isinstance(result, SkippedRecord):
                    report.skipped.append(result)
                    continue
                part, measure = result
                report.image_parts[part] += 1
                if measure is not None:
                    tallies.setdefault(split_of.get(shard, "train"), TokenTally()).add(measure)
        bar.close()
        pool.shutdown(wait=True)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    if tallies:
        report.token_statistics = report_section(tallies, checker.rules.source)
        report.token_statistics["measured_on"] = "checked records" if check is not None else "all records"


def index(
    source: Path,
    meta: Optional[Path] = None,
    caption: str = "auto",
    check: Union[int, str, None] = DEFAULT_CHECK,
    split_ratio: Optional[str] = None,
    valid_fraction: Optional[float] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    verify_decode: bool = False,
    rules: Optional[TrainerRules] = None,
    overwrite: bool = False,
    workers: int = 8,
    seed: int = 0,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    progress: bool = True,
) -> IndexReport:
    """Make the img2dataset-style shards under `source` trainable (module docstring).

    meta: write the metadata into this folder (links to the shards) instead of into `source`.
    caption: txt, json:KEY, or auto (txt when the records have a .txt part, else json:caption ...).
    check: records to check (default 300), "all" or None for every record.
    split_ratio / valid_fraction: as for `prepare` (whole shards; not both).
    rules: the trainer checks to apply (default: those that hold for every recipe).
    """
    for flag, value in (
        ("--workers", workers),
        ("--max-pixels", max_pixels),
        ("--max-image-bytes", max_image_bytes),
        ("--max-text-chars", max_text_chars),
    ):
        if value < 1:
            raise IndexingError(f"{flag} must be at least 1, got {value}")
    if isinstance(check, str):
        check = parse_check(check)
    elif check is not None and (isinstance(check, bool) or not isinstance(check, int) or check < 1):
        raise IndexingError(f"--check must be at least 1 (or all), got {check}")
    split_ratio = _split_arguments(split_ratio, valid_fraction)
    ratio = parse_split_ratio(split_ratio)
    flag = _split_flag(split_ratio, valid_fraction)
    source = Path(source)
    check_folder(source, "SRC")
    if is_prepared_output(source):
        raise IndexingError(
            f"{source} was written by sail-data prepare: it is trainable as it is (use it as data.path)"
        )
    shards = _find_shards(source)
    if not shards:
        raise IndexingError(f"no .tar shards under {source}; SRC is the folder holding the WebDataset shards")
    _check_split_shards(ratio, len(shards), flag, ratio[1] > 0)
    caption = _detect_caption(source, shards) if caption == "auto" else caption
    try:
        parse_caption(caption)
    except ValueError as e:
        raise IndexingError(str(e)) from None
    rules = rules or TrainerRules.structural(max_pixels)
    text_bound = "--max-text-chars"
    if rules.max_text_chars is not None and rules.max_text_chars < max_text_chars:
        max_text_chars, text_bound = rules.max_text_chars, rules.text_bound
    checker = _Checker(caption, max_pixels, verify_decode, rules, max_image_bytes, max_text_chars, text_bound)
    source_name = str(Path(os.path.realpath(source)))

    if meta is None:
        # Marked read-only (no write bit for anyone) counts as read-only even for root, whom no mode stops.
        if not os.access(source, os.W_OK | os.X_OK) or not source.stat().st_mode & 0o222:
            raise OutputError(
                f"cannot write in {source}: index read-only data with --meta DIR (the metadata goes there, with "
                "links to the shards; the shards stay where they are)"
            )
        if (source / _META).exists():
            if not _indexed_in_place(source):
                raise OutputError(
                    f"{source} already holds energon metadata (.nv-meta) that sail-data index did not write; "
                    "remove it yourself, or index into a folder of its own with --meta DIR"
                )
            if not overwrite:
                raise FileExistsError(f"{source} is already indexed; pass --overwrite to index it again")
        report = IndexReport(source_name, source_name, caption)
        with _InPlace(source, shards) as folder:
            _index_into(folder, report, checker, split_ratio, ratio, flag, check, seed, workers, progress, source)
            _write_report(folder, report, rules, check, seed)
        return report

    meta = Path(meta)
    check_separate(meta, input_dirs=[source], flag="--meta")
    check_out(meta, overwrite, is_index_output, "a sail-data index --meta folder", flag="--meta")
    report = IndexReport(source_name, str(Path(os.path.realpath(meta))), caption)
    with staged(meta) as stage:
        _link_shards(source, shards, stage)
        _index_into(stage, report, checker, split_ratio, ratio, flag, check, seed, workers, progress, meta)
        _write_report(stage, report, rules, check, seed)
    return report
