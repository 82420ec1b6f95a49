"""LLaVA-style conversations or caption JSONL + an image folder -> energon-ready WebDataset shards; or the
same from a parquet file whose rows carry the image bytes (`parquet_input.py`).

Conversations are LLaVA's turns `{from, value}` or OpenAI's messages `{role, content}` (under `conversations`
or `messages`; a content may be a list of text and image parts, each image part an <image> placeholder).

Every input record is either written or reported with the reason it was skipped (missing file,
unreadable image, malformed line, placeholder mismatch, a sample the trainer would reject); nothing is
dropped silently. Images are checked from their headers (and fully decoded with `verify_decode`), and
their sizes are stored.

Safety: every argument and input is checked before anything is written; the output is built in a hidden
sibling folder and renamed into place at the end, so a failed run leaves no half-written `out_dir`, and
`overwrite` only ever replaces an earlier output of this function (`out_dir.py`).

Memory stays flat in the input's size: at most `max_in_flight` records (images included) are read ahead
of the writer, and shards are written in input order whatever the thread timing.

Scale-out: `num_shards`/`shard_index` select every N-th record (`records.py`), one command per machine,
each into its own folder; `sail-data join` blends the parts (`blend.join_parts`).

Bounds: inputs are read only if they are regular files (`input_files.py`: a FIFO, a device such as /dev/zero,
a socket or a folder in an image's place is skipped as `image_not_a_file`, naming the kind), and nothing is
read past a stated limit: `max_image_bytes` per image file (`image_file_too_big`; default 128 MiB, far above
any 64-megapixel photo, but a valid JPEG followed by hundreds of MB of junk never reaches a shard),
`max_record_bytes` per JSON Lines record (`record_too_large`; records nested deeper than 100 levels are
`record_too_deep`). A record with more than `max_text_chars` characters of text (default one million) is
skipped as `text_too_long` before anything tokenizes it: training would tokenize all of it on every pass only
to cut or skip it. With a recipe the bound is lowered to what `seq_length` tokens of the recipe's tokenizer
can hold at most (`TrainerRules.max_text_chars`).

Measured: with a recipe, every written record's tokens and tiles as the trainer encodes them are summed per
split into the report's `token_statistics` (`statistics.py`; `sail-data stats` reads them back).
"""

import errno
import functools
import io
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, TypeVar, Union

from tqdm import tqdm

from sail_megatron.config.data import DEFAULT_MAX_PIXELS
from sail_megatron.data.blend import split_samples, split_shards
from sail_megatron.data.image_io import ImageError, decode_rgb, read_image_size
from sail_megatron.data.input_files import FileTooLarge, NotRegularFile, check_folder, check_regular, read_regular
from sail_megatron.data.out_dir import OutputError, check_out, check_separate, layout_matches, staged
from sail_megatron.data.parquet_input import ParquetColumns, ParquetRecords, is_parquet, open_parquet
from sail_megatron.data.records import (
    DEFAULT_MAX_RECORD_BYTES,
    EmbeddedImage,
    Record,
    RecordCount,
    RecordProblem,
    check_shard,
    read_records,
)
from sail_megatron.data.sample import IMAGE_PLACEHOLDER
from sail_megatron.data.statistics import SECTION, SampleMeasure, TokenTally, report_section
from sail_megatron.data.trainer_rules import TrainerRules

logger = logging.getLogger(__name__)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FORMATS = ("llava", "caption")
REPORT_NAME = "prepare_report.json"
DEFAULT_SPLIT = "1,0,0"
"""train,val,test shares of the shards: everything trains unless a split is asked for."""
DEFAULT_MAX_IMAGE_BYTES = 128 << 20
"""Image files larger than this (128 MiB) are skipped unread (`--max-image-bytes`)."""
DEFAULT_MAX_TEXT_CHARS = 1_000_000
"""Records with more characters of text than this are skipped (`--max-text-chars`)."""
# What a finished prepare folder holds (energon adds .nv-meta and the .tar.idx files).
OUTPUT_LAYOUT = ("shard-*.tar", "shard-*.tar.idx", REPORT_NAME, ".nv-meta")

# Errors of the output's filesystem: reported as one line naming the file, not as a traceback.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})

T = TypeVar("T")
R = TypeVar("R")


class PrepareError(ValueError):
    """The run cannot produce a usable dataset; the message says why and what to change."""


@dataclass
class SkippedRecord:
    source: str  # file:line (or file:[index] for a JSON array)
    id: Optional[str]
    reason: str
    detail: str


@dataclass
class PrepareReport:
    written: int = 0
    shards: int = 0
    skipped: List[SkippedRecord] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)
    split_samples: Dict[str, int] = field(default_factory=dict)  # samples per split, when a split was asked for
    split_note: str = ""  # how far the whole-shard split is from the share asked for
    token_statistics: Optional[dict] = None  # the report's section, when a recipe measured the samples
    input_note: str = ""  # what was read, when that was detected (a parquet file's columns)
    input_columns: Optional[dict] = None  # a parquet file's columns, as read

    def by_reason(self) -> Counter:
        return Counter(s.reason for s in self.skipped)

    def summary(self) -> str:
        lines = [self.input_note] if self.input_note else []
        lines.append(f"wrote {self.written} samples in {self.shards} shards; skipped {len(self.skipped)}")
        if self.split_samples and self.written:
            parts = ", ".join(f"{part} {n} ({100 * n / self.written:.1f} %)" for part, n in self.split_samples.items())
            lines.append(f"  splits (whole shards): {parts}")
        if self.split_note:
            lines.append(f"  note: {self.split_note}")
        if self.token_statistics:
            t = self.token_statistics
            lines.append(
                f"  measured: {t['mean_tokens_per_sample']:.1f} tokens and {t['mean_tiles_per_sample']:.2f} tiles "
                f"per sample ({t['tokens']} tokens in {t['samples']} samples)"
            )
        lines += [f"  skipped {n:6d} x {reason}" for reason, n in sorted(self.by_reason().items())]
        lines += [f"  converted {n:6d} x {what}" for what, n in sorted(self.converted.items())]
        return "\n".join(lines)


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def is_prepared_output(folder: Path) -> bool:
    """A folder this module wrote: its report or energon's metadata, and nothing we do not write."""
    has_marker = (folder / REPORT_NAME).is_file() or (folder / ".nv-meta").is_dir()
    return has_marker and layout_matches(folder, OUTPUT_LAYOUT)


def parse_split_ratio(text: str) -> Tuple[float, float, float]:
    """`train,val,test` shares as energon reads them (three numbers it normalizes by their sum)."""
    fix = "give three non-negative numbers train,val,test with a positive train share, e.g. 1,0,0 or 8,1,1"
    try:
        parts = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        raise PrepareError(f"--split-ratio {text!r} is not three numbers; {fix}") from None
    if len(parts) != 3 or not all(math.isfinite(x) and x >= 0 for x in parts) or parts[0] <= 0:
        raise PrepareError(f"--split-ratio {text!r}: {fix}")
    return parts  # type: ignore[return-value]


def valid_fraction_split(fraction: float) -> str:
    """`--valid-fraction F` as the split ratio it means: train 1-F, val F, no test."""
    if not 0 < fraction < 1:
        raise PrepareError(f"--valid-fraction {fraction}: give a share between 0 and 1, e.g. 0.02")
    return f"{1 - fraction:g},{fraction:g},0"


def _split_flag(split_ratio: str, valid_fraction: Optional[float]) -> str:
    """The flag the user gave for the split, as messages name it."""
    return f"--valid-fraction {valid_fraction:g}" if valid_fraction is not None else f"--split-ratio {split_ratio}"


def _check_splits(
    ratio: Tuple[float, float, float],
    shards: int,
    shard_size: int,
    written: int,
    split_ratio: str,
    valid_fraction: Optional[float],
) -> None:
    # energon assigns int(shards * cumulative share) shards to each split, in order.
    flag = _split_flag(split_ratio, valid_fraction)
    train_end = int(shards * ratio[0] / sum(ratio))
    no_val = ratio[1] > 0 and int(shards * (ratio[0] + ratio[1]) / sum(ratio)) - train_end < 1
    if valid_fraction is not None and (train_end < 1 or no_val):
        suggest = max(1, math.ceil(written * valid_fraction))
        raise PrepareError(
            f"{flag} holds whole shards out, and the {shards} shard(s) written cannot give both the train and "
            f"the val split a shard; lower --shard-size (now {shard_size}, {written} samples written), "
            f"e.g. --shard-size {suggest}"
        )
    if train_end < 1:
        raise PrepareError(
            f"{flag} leaves the train split no shard of the {shards} written; "
            f"lower --shard-size (now {shard_size}) or raise the train share"
        )
    if no_val:
        raise PrepareError(
            f"{flag} holds out no shard of the {shards} written for validation (splits are "
            f"whole shards); lower --shard-size (now {shard_size}) or raise the validation share"
        )


def _split_report(
    folder: Path, ratio: Tuple[float, float, float], written: int, shard_size: int, flag: str
) -> Tuple[Dict[str, int], str]:
    """Samples per split as energon assigned them, and a note when the whole shards held out are far from
    the share asked for."""
    counts = {part: split_samples(folder, part) for part in ("train", "val", "test")}
    asked = (ratio[1] + ratio[2]) / sum(ratio)
    held = (counts["val"] + counts["test"]) / max(written, 1)
    note = ""
    if abs(held - asked) > max(0.005, 0.1 * asked):
        note = (
            f"{flag} asked for {100 * asked:.3g} % held out, but splits are whole shards of {shard_size} samples, "
            f"so {100 * held:.1f} % is held out; lower --shard-size for a closer share"
        )
    return counts, note


_IMAGE_PART_TYPES = frozenset({"image", "image_url", "input_image"})


def _content(content: object) -> Optional[str]:
    """An OpenAI-style message content as text: a string, or a list of parts where text parts give their text
    and image parts an <image> placeholder, one part per line. None when it is neither."""
    if isinstance(content, str) or content is None:
        return content
    if not isinstance(content, list):
        return None
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in _IMAGE_PART_TYPES:
            pieces.append(IMAGE_PLACEHOLDER)
        elif isinstance(part, str):
            pieces.append(part)
        else:
            return None
    return "\n".join(pieces)


def _turn(turn: object) -> Tuple[object, object]:
    """(role, text) of a LLaVA turn {from, value} or an OpenAI message {role, content}; parquet rows carry
    both key pairs, the unused ones None."""
    if not isinstance(turn, dict):
        return None, None
    if turn.get("from") is not None or turn.get("value") is not None:
        return turn.get("from"), turn.get("value")
    return turn.get("role"), _content(turn.get("content"))


def _normalize(record: object, fmt: str) -> Tuple[dict, List[Union[str, EmbeddedImage]], List[str]]:
    """Record -> (shard json without image info, image paths, conversions applied). Raises _Skip."""
    if isinstance(record, RecordProblem):
        raise _Skip(record.reason, record.detail)
    if isinstance(record, Exception):
        raise _Skip("malformed_line", str(record))
    if isinstance(record, list):
        raise _Skip(
            "malformed_line", "expected a JSON object, got a list (a JSON array of records belongs in a .json file)"
        )
    if not isinstance(record, dict):
        raise _Skip("malformed_line", f"expected a JSON object, got {type(record).__name__}")
    images = record.get("image", record.get("images"))
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    elif not isinstance(images, list):
        raise _Skip("malformed_line", f"'image' must be a path or a list of paths, got {type(images).__name__}")
    if not all(isinstance(p, (str, EmbeddedImage)) for p in images):
        raise _Skip("malformed_line", "image paths must be strings")
    if fmt == "caption":
        caption = record.get("caption", record.get("text"))
        if not isinstance(caption, str) or not caption.strip():
            raise _Skip("malformed_line", "no caption text")
        if not images:
            raise _Skip("malformed_line", "a caption record needs an image")
        return {"kind": "caption", "turns": [{"role": "caption", "text": caption.strip()}]}, images, []
    conversations = record.get("conversations", record.get("messages"))
    if not isinstance(conversations, list) or not conversations:
        keys = ", ".join(map(str, list(record)[:6])) or "none"
        raise _Skip("malformed_line", f"no conversations list (the record's keys: {keys})")
    turns = []
    for turn in conversations:
        role, text = _turn(turn)
        if role not in _ROLES or not isinstance(text, str):
            raise _Skip("malformed_line", f"bad turn {turn!r:.80}")
        turns.append({"role": _ROLES[role], "text": text})
    if not any(t["role"] == "assistant" for t in turns):
        raise _Skip("malformed_line", "no assistant turn to train on")
    placeholders = sum(t["text"].count(IMAGE_PLACEHOLDER) for t in turns)
    conversions = []
    if placeholders == 0 and images:
        # LLaVA/InternVL convention: images without placeholders go before the first user text.
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is None:
            raise _Skip("placeholder_mismatch", f"{len(images)} images but no user turn to show them in")
        first_user["text"] = "\n".join([IMAGE_PLACEHOLDER] * len(images)) + "\n" + first_user["text"]
        conversions.append("added_image_placeholders")
    elif placeholders != len(images):
        raise _Skip("placeholder_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
    return {"kind": "conversation", "turns": turns}, images, conversions


def check_image(data: bytes, where: object, max_pixels: int, verify_decode: bool) -> Tuple[int, int]:
    """(width, height) of an image's bytes from its header (and a full decode with `verify_decode`);
    raises _Skip with reason image_<why> (`image_io.ImageError`) naming `where`."""
    try:
        width, height = read_image_size(data, max_pixels=max_pixels)
        if verify_decode:
            decode_rgb(data, max_pixels=max_pixels)
    except ImageError as e:
        raise _Skip(f"image_{e.reason}", f"{where}: {e}") from None
    return width, height


def _image_path(images_dir: Path, name: str, allow_outside: bool) -> Path:
    """`name` under `images_dir`; absolute paths and `..` that leave the folder only when allowed."""
    rel = os.path.normpath(name)
    if not allow_outside and (os.path.isabs(name) or rel == ".." or rel.startswith(".." + os.sep)):
        raise _Skip(
            "outside_images",
            f"{name!r} is not inside --images {images_dir}; pass --allow-outside-images to read it anyway",
        )
    return images_dir / name


def _read_file(path: Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """An image file's bytes: a regular file of at most `max_bytes` (`input_files.read_regular`)."""
    return read_regular(path, max_bytes)


def text_chars(meta: dict) -> int:
    """Characters of text in a normalized record (every turn)."""
    return sum(len(t["text"]) for t in meta["turns"])


class _Entry(NamedTuple):
    """A record ready for the shard writer."""

    meta_json: bytes
    images: List[Tuple[bytes, str]]
    conversions: List[str]
    measure: Optional[SampleMeasure]  # with a recipe: what the trainer will make of it


@dataclass(frozen=True)
class _Reader:
    """Everything a worker thread needs to turn one record into a shard entry."""

    fmt: str
    images_dir: Path
    max_pixels: int
    verify_decode: bool
    allow_outside: bool
    rules: TrainerRules
    read_file: Callable[[Path], bytes]
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    text_bound: str = "--max-text-chars"  # what the text bound comes from, for the skip detail
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # for images carried in the record (files: read_file's bound)

    def _load(self, image: Union[str, EmbeddedImage]) -> Tuple[bytes, int, int]:
        if not isinstance(image, EmbeddedImage):
            return self._image(_image_path(self.images_dir, image, self.allow_outside))
        if len(image.data) > self.max_image_bytes:
            raise _Skip(
                "image_file_too_big",
                f"{image.name} holds {len(image.data)} bytes, over the limit of {self.max_image_bytes} (--max-image-bytes)",
            )
        width, height = check_image(image.data, image.name, self.max_pixels, self.verify_decode)
        return image.data, width, height

    def _image(self, path: Path) -> Tuple[bytes, int, int]:
        try:
            data = self.read_file(path)
        except NotRegularFile as e:
            raise _Skip("image_not_a_file", str(e)) from None
        except IsADirectoryError:
            raise _Skip("image_not_a_file", f"{path} is a folder, not a regular file") from None
        except FileTooLarge as e:
            raise _Skip("image_file_too_big", f"{e} (--max-image-bytes)") from None
        except (FileNotFoundError, NotADirectoryError):
            raise _Skip("missing_image", str(path)) from None
        except OSError as e:  # permissions, I/O errors: this image only, not the whole run
            raise _Skip("unreadable_image", f"{path}: {e.strerror or e}") from None
        width, height = check_image(data, path, self.max_pixels, self.verify_decode)
        return data, width, height

    def __call__(self, rec: Record) -> Union[SkippedRecord, _Entry]:
        """The shard entry (json, [(image bytes, extension)]), or why the record is skipped."""
        record = rec.value
        try:
            meta, paths, conversions = _normalize(record, self.fmt)
            chars = text_chars(meta)
            if chars > self.max_text_chars:
                raise _Skip(
                    "text_too_long",
                    f"{chars} characters of text, more than {self.max_text_chars} ({self.text_bound})",
                )
            loaded = [self._load(p) for p in paths]
            meta.update(
                conversions=conversions,
                source=rec.source,
                id=record.get("id"),
                num_images=len(loaded),
                images=[{"width": w, "height": h, "format": _extension(p)} for (_, w, h), p in zip(loaded, paths)],
            )
            meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
            images = [(d, _extension(p)) for (d, _, _), p in zip(loaded, paths)]
            verdict = self.rules.assess(meta_json, images)
            if verdict.rejection is not None:
                raise _Skip(*verdict.rejection)
        except _Skip as s:
            rid = record.get("id") if isinstance(record, dict) else getattr(record, "id", None)
            return SkippedRecord(rec.source, None if rid is None else str(rid), s.reason, s.detail)
        return _Entry(meta_json, images, conversions, verdict.measure)


_MAGIC = (
    (b"\xff\xd8", "jpg"),
    (b"\x89PNG", "png"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\0", "tif"),
    (b"MM\0*", "tif"),
)


def _extension(path: Union[str, EmbeddedImage]) -> str:
    if isinstance(path, EmbeddedImage):  # what its first bytes say, else the name it came with
        if path.data[:4] == b"RIFF" and path.data[8:12] == b"WEBP":
            return "webp"
        return next((e for magic, e in _MAGIC if path.data.startswith(magic)), None) or _extension(path.name)
    ext = Path(path).suffix.lower().lstrip(".")
    return {"jpeg": "jpg"}.get(ext, ext) or "img"


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """`pool.map` in input order, but with at most `window` results submitted and not yet consumed,
    so memory does not grow with the number of items (Executor.map submits them all at once)."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    pending: deque[Future] = deque()
    try:
        for item in items:
            if len(pending) >= window:
                yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:  # the consumer stopped early (an error): do not read what nobody will write
            f.cancel()


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


class _ShardWriter:
    """Deterministic tar shards of `shard_size` samples (fixed mtimes and ownership)."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.count, self.shards, self._tar = 0, 0, None
        self.current = out_dir / _shard_name(0)  # the file being written, for error messages

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, meta: Union[dict, bytes], images: List[Tuple[bytes, str]]) -> None:
        if self.count % self.shard_size == 0:
            self.close()
            self.current = self.out_dir / _shard_name(self.shards)
            self._tar = tarfile.open(self.current, "w", format=tarfile.USTAR_FORMAT)
            self.shards += 1
        key = f"{self.count:09d}"  # sortable and dot-free: WebDataset splits keys at the first dot
        if isinstance(meta, dict):
            meta = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
        self._add(f"{key}.json", meta)
        for i, (data, ext) in enumerate(images):
            self._add(f"{key}.img{i}.{ext}", data)
        self.count += 1

    def close(self) -> None:
        if self._tar is not None:
            tar, self._tar = self._tar, None
            tar.close()

    def abandon(self) -> None:
        """Drop the open shard after a failure (its folder is deleted anyway)."""
        try:
            self.close()
        except OSError:
            pass


def run_energon_prepare(
    out_dir: Path, split_ratio: str, name: Optional[Path] = None, dataset_yaml: Optional[dict] = None
) -> None:
    """energon's own preparation (index + split + dataset.yaml for cooked crude samples).

    name: the folder to name in errors (the final path when `out_dir` is a staging folder).
    dataset_yaml: written as `.nv-meta/dataset.yaml` instead of energon's plain CrudeWebdataset one (e.g. with
      the subflavors that pick a cooker: `img2dataset.dataset_yaml`)."""
    cmd = [
        sys.executable,
        "-m",
        "megatron.energon.cli.main",
        "prepare",
        str(out_dir),
        "--non-interactive",
        "--split-ratio",
        split_ratio,
        "--sample-type",
        "CrudeWebdataset",
        "--no-progress",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    output = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
    name = name or out_dir
    if result.returncode != 0:
        raise PrepareError(f"energon prepare failed for {name} (exit code {result.returncode}):\n{output}")
    # energon reports some problems (an invalid split) on stdout and still exits 0.
    dataset_yaml_path = Path(out_dir) / ".nv-meta" / "dataset.yaml"
    if not dataset_yaml_path.is_file():
        raise PrepareError(f"energon prepare wrote no .nv-meta/dataset.yaml for {name}:\n{output}")
    if dataset_yaml is not None:
        import yaml

        dataset_yaml_path.write_text(yaml.safe_dump(dataset_yaml, sort_keys=False))


def _check_arguments(fmt: Optional[str], num_shards: int, shard_index: int, **at_least_one: int) -> None:
    """at_least_one: {flag name with _ for -: value}."""
    if fmt is not None and fmt not in FORMATS:
        raise PrepareError(f"--format must be one of {FORMATS}, got {fmt!r}")
    for name, value in at_least_one.items():
        if value < 1:
            raise PrepareError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    check_shard(num_shards, shard_index)


def _split_arguments(split_ratio: Optional[str], valid_fraction: Optional[float]) -> str:
    """The split ratio energon gets, from --split-ratio or --valid-fraction (one of them at most)."""
    if valid_fraction is None:
        return DEFAULT_SPLIT if split_ratio is None else split_ratio
    if split_ratio is not None:
        raise PrepareError(
            f"give --valid-fraction or --split-ratio, not both (got --valid-fraction {valid_fraction:g} and "
            f"--split-ratio {split_ratio}); --valid-fraction F means --split-ratio 1-F,F,0"
        )
    return valid_fraction_split(valid_fraction)


def _check_inputs(input_path: Path, images_dir: Optional[Path]) -> None:
    try:
        check_regular(input_path, "--input")
    except FileNotFoundError:
        raise FileNotFoundError(f"--input {input_path} does not exist") from None
    except PermissionError:
        raise PrepareError(f"--input {input_path} is not readable (permissions)") from None
    if images_dir is not None:
        check_folder(images_dir, "--images")
    elif not is_parquet(input_path):
        raise PrepareError(f"--images is needed for {input_path}: the folder its records' image paths are relative to")


def _no_records_error(
    input_path: Path, report: PrepareReport, num_shards: int, shard_index: int, total: int
) -> PrepareError:
    where = f"{input_path}" + (f" (shard {shard_index} of {num_shards})" if num_shards > 1 else "")
    if not report.skipped and total > 0:
        return PrepareError(
            f"no records in part {shard_index} of {num_shards} of {input_path}: the file holds {total} records, and "
            f"this part takes records i with i % {num_shards} == {shard_index}; use at most {total} for --num-shards"
        )
    if not report.skipped:
        return PrepareError(f"no records in {where}: the file is empty")
    reasons = ", ".join(f"{n} x {r}" for r, n in report.by_reason().most_common())
    first = "\n".join(f"  {s.source}: {s.reason}: {s.detail}" for s in report.skipped[:3])
    return PrepareError(f"no valid records in {where}; skipped {reasons}. The first:\n{first}")


def _input_identity(path: Path) -> str:
    """What tells input files apart in `sail-data join` (blend.check_parts_cover): name and size."""
    return f"{Path(path).name} ({os.stat(path).st_size} bytes)"


def _write_report(
    out_dir: Path, report: PrepareReport, shard: Tuple[int, int], rules: TrainerRules, input_path: Path
) -> None:
    doc = {
        "written": report.written,
        "shards": report.shards,
        "split_samples": report.split_samples,
        "converted": dict(report.converted),
        "skipped_by_reason": dict(report.by_reason()),
        "skipped": [asdict(s) for s in report.skipped],
        # The input by name and size, not path: the machines that prepare the parts of one file may mount it apart.
        "input_shard": {"num_shards": shard[0], "shard_index": shard[1], "input": _input_identity(input_path)},
        "input_columns": report.input_columns,
        "trainer_rules": rules.source,
        SECTION: report.token_statistics,
    }
    (out_dir / REPORT_NAME).write_text(json.dumps(doc, indent=1, sort_keys=True))


def _write_shards(
    stage: Path,
    records: Iterable[Record],
    reader: _Reader,
    shard_size: int,
    workers: int,
    window: int,
    progress: bool,
    out_name: Path,
) -> Tuple[PrepareReport, List[TokenTally]]:
    """The report, and per shard written the sums over its measured samples (none without a recipe)."""
    report = PrepareReport()
    tallies: List[TokenTally] = []
    writer = _ShardWriter(stage, shard_size)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        results = bounded_map(pool, reader, records, window)
        for result in tqdm(results, desc="prepare", unit=" records", disable=not progress):
            if isinstance(result, SkippedRecord):
                report.skipped.append(result)
                logger.warning("skipped %s (id %s): %s: %s", result.source, result.id, result.reason, result.detail)
                continue
            report.converted.update(result.conversions)
            writer.write(result.meta_json, result.images)
            if result.measure is not None:  # with a recipe: every record
                while len(tallies) < writer.shards:
                    tallies.append(TokenTally())
                tallies[-1].add(result.measure)
        writer.close()
        pool.shutdown(wait=True)
    except OSError as e:
        pool.shutdown(wait=False, cancel_futures=True)
        writer.abandon()
        if e.errno in _WRITE_ERRNOS:
            raise OutputError(
                f"cannot write {out_name}/{writer.current.name}: {e.strerror}; free space there or choose another --out"
            ) from None
        raise
    except BaseException:  # an error, or a stop signal (out_dir.Interrupted): never wait for busy workers
        pool.shutdown(wait=False, cancel_futures=True)
        writer.abandon()
        raise
    report.written, report.shards = writer.count, writer.shards
    return report, tallies


def _split_tallies(folder: Path, tallies: List[TokenTally]) -> Dict[str, TokenTally]:
    """The shards' sums added up per split, as energon assigned the shards."""
    of_shard = {_shard_name(i): tally for i, tally in enumerate(tallies)}
    by_split = {}
    for part in ("train", "val", "test"):
        by_split[part] = TokenTally()
        for name in split_shards(folder, part):
            by_split[part].merge(of_shard[name])
    return by_split


def prepare(
    input_path: Path,
    images_dir: Optional[Path],
    out_dir: Path,
    fmt: Optional[str] = None,
    shard_size: int = 1000,
    split_ratio: Optional[str] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    verify_decode: bool = False,
    workers: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    num_shards: int = 1,
    shard_index: int = 0,
    allow_outside_images: bool = False,
    rules: Optional[TrainerRules] = None,
    max_in_flight: Optional[int] = None,
    read_file: Optional[Callable[[Path], bytes]] = None,
    valid_fraction: Optional[float] = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    columns: Optional[ParquetColumns] = None,
) -> PrepareReport:
    """Write `input_path`'s records (shard `shard_index` of `num_shards`) as shards into `out_dir`.

    input_path: JSON/JSONL records with image paths under `images_dir`, or a parquet file (`.parquet`) whose rows
      carry the images (`parquet_input.py`; `images_dir` None).
    fmt: llava or caption; None: llava for JSON input, detected from a parquet file's columns.
    columns: a parquet file's columns (default: detected).

    split_ratio: train,val,test shares of the shards (default 1,0,0); valid_fraction F is 1-F,F,0 (not both).
    rules: the trainer checks to apply (default: those that hold for every recipe).
    max_in_flight: records read ahead of the writer (default 4 per worker).
    read_file: how image files are read (tests inject one to watch the reads; default: regular files of at
      most max_image_bytes).
    max_image_bytes, max_record_bytes, max_text_chars: the bounds of the module docstring.
    """
    _check_arguments(
        fmt,
        num_shards,
        shard_index,
        shard_size=shard_size,
        max_pixels=max_pixels,
        workers=workers,
        max_image_bytes=max_image_bytes,
        max_record_bytes=max_record_bytes,
        max_text_chars=max_text_chars,
    )
    split_ratio = _split_arguments(split_ratio, valid_fraction)
    ratio = parse_split_ratio(split_ratio)
    input_path, out_dir = Path(input_path), Path(out_dir)
    images_dir = None if images_dir is None else Path(images_dir)
    _check_inputs(input_path, images_dir)
    check_separate(out_dir, input_files=[input_path], input_dirs=[images_dir] if images_dir is not None else [])
    parquet = None
    if is_parquet(input_path):
        parquet, note = open_parquet(input_path, columns or ParquetColumns(), fmt)
        fmt = parquet.fmt
    elif columns is not None:
        raise PrepareError(f"column flags are for parquet input; {input_path} is read as JSON records")
    fmt = fmt or "llava"
    check_out(out_dir, overwrite, is_prepared_output, "a sail-data prepare output")
    rules = rules or TrainerRules.structural(max_pixels)
    text_bound = "--max-text-chars"
    if rules.max_text_chars is not None and rules.max_text_chars < max_text_chars:
        max_text_chars, text_bound = rules.max_text_chars, rules.text_bound
    reader = _Reader(
        fmt,
        images_dir or Path("."),
        max_pixels,
        verify_decode,
        allow_outside_images,
        rules,
        read_file or functools.partial(_read_file, max_bytes=max_image_bytes),
        max_text_chars,
        text_bound,
        max_image_bytes,
    )
    window = max_in_flight or 4 * workers
    count = RecordCount()
    with staged(out_dir) as stage:
        if parquet is not None:
            records = ParquetRecords(input_path, parquet, num_shards, shard_index, count)
        else:
            records = read_records(input_path, num_shards, shard_index, max_record_bytes, count)
        report, tallies = _write_shards(stage, records, reader, shard_size, workers, window, progress, out_dir)
        if parquet is not None:
            report.input_note, report.input_columns = note, parquet.describe()
        if report.written == 0:
            raise _no_records_error(input_path, report, num_shards, shard_index, count.total)
        _check_splits(ratio, report.shards, shard_size, report.written, split_ratio, valid_fraction)
        run_energon_prepare(stage, split_ratio, name=out_dir)
        if ratio[1] + ratio[2] > 0:
            flag = _split_flag(split_ratio, valid_fraction)
            report.split_samples, report.split_note = _split_report(stage, ratio, report.written, shard_size, flag)
        if tallies:
            report.token_statistics = report_section(_split_tallies(stage, tallies), rules.source)
        try:
            _write_report(stage, report, (num_shards, shard_index), rules, input_path)
        except OSError as e:
            raise OutputError(f"cannot write {out_dir / REPORT_NAME}: {e.strerror}") from None
    return report
