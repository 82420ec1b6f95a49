"""`sail-data show`: one record of a `sail-data prepare` input, rendered as the trainer renders it.

The record is read and normalized by prepare's own reader, image sizes come from the headers (as the
task encoder reads them), tiles are planned by `plan_tiles` and the text is tokenized by `ChatTemplate`,
so the token ids, the loss mask and the image blocks' lengths are the ones training would use. What a
chat template, a system prompt or a tiling setting does to the data can be checked before any shard is
written.

Several records can be shown by one call (`--index 0-39`, `--index 0,5,7`): the file is read once and the
tokenizer loaded once, so each further record costs milliseconds. Starting the command (importing torch,
transformers and energon, loading the tokenizer) takes seconds; that is why one call per record was slow.

Inputs are read as prepare reads them: regular files only, within the same size bounds, and a record whose
text prepare would skip as too long is refused before it is tokenized.

Argument problems raise ValueError with a message that names the argument (`sail-data` prints it and
exits with code 2).
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from sail_megatron.config.data import DEFAULT_MAX_PIXELS
from sail_megatron.data.chat_template import ChatTemplate, SkipReason
from sail_megatron.data.image_io import ImageError, read_image_size
from sail_megatron.data.input_files import FileTooLarge, NotAFolder, NotRegularFile, check_files_in, check_folder
from sail_megatron.data.prepare import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_TEXT_CHARS,
    _image_path,
    _normalize,
    _read_file,
    _Skip,
    text_chars,
)
from sail_megatron.data.records import InputError, Record, RecordCount, read_records
from sail_megatron.data.sample import MalformedSample, VLSample
from sail_megatron.data.templates import DEFAULT_TEMPLATE, get_template
from sail_megatron.data.tiling import TilePlan, plan_tiles
from sail_megatron.data.tokenizer import Tokenizer, load_tokenizer

TILE_SIZE = 448
TOKENS_PER_TILE = 256
"""SAIL-VL's: 448px tiles of 14px patches, pixel-shuffled 2x2 -> 16x16 tokens."""
_NO_LIMIT = 2**31 - 1
MAX_INDEXES = 100_000
"""Records one call shows at most."""

_GREEN, _RESET = "\x1b[32m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"
"""Around trained text when colour is off (stdout is not a terminal)."""


@dataclass
class Segment:
    """A run of the rendered sequence: text (trained or not), or one whole image block."""

    ids: List[int]
    trained: bool = False
    image_tokens: Optional[int] = None  # <IMG_CONTEXT> count when this is an image block


@dataclass
class Shown:
    source: str  # file:line of the record
    template: str
    tokens_per_tile: int
    input_ids: List[int]
    loss_mask: List[int]  # 1 where input_ids[i] is a trained target
    plans: List[TilePlan]
    notes: Dict[str, int] = field(default_factory=dict)  # over-length conversions (dropped rounds, cuts)

    @property
    def num_tiles(self) -> int:
        return sum(p.num_tiles for p in self.plans)


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        check_folder(path, "--tokenizer")
    except NotAFolder as e:
        raise ValueError(f"{e}; point it at a local Hugging Face tokenizer folder") from None
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"--tokenizer {path} holds no tokenizer.json or tokenizer_config.json")
    try:
        check_files_in(path, "--tokenizer")  # transformers opens them itself: no FIFO or device may block it
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer {path}: {e}") from None


def parse_indexes(text: str) -> List[int]:
    """`--index`: '3', '0-39' (both ends included) or a comma list of both, e.g. '0,5,10-19'."""
    fix = "give record numbers counted from 0: N, a range A-B or a comma list, e.g. 0,5,10-19"
    out: List[int] = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise ValueError(f"--index {text!r}: {fix}")
        first = int(m.group(1))
        last = first if m.group(2) is None else int(m.group(2))
        if last < first:
            raise ValueError(f"--index {text!r}: the range {part.strip()} ends before it starts; {fix}")
        if len(out) + last - first + 1 > MAX_INDEXES:
            raise ValueError(f"--index {text!r}: at most {MAX_INDEXES} records per call")
        out.extend(range(first, last + 1))
    return out


def _records(path: Path, indexes: Sequence[int], max_record_bytes: Optional[int] = None) -> List[Record]:
    """The records at `indexes` (in that order), reading the file once and only as far as needed."""
    bad = next((i for i in indexes if i < 0), None)
    if bad is not None:
        raise ValueError(f"--index must be >= 0, got {bad}")
    wanted, found, count = set(indexes), {}, RecordCount()
    kwargs = {} if max_record_bytes is None else {"max_record_bytes": max_record_bytes}
    try:
        for rec in read_records(path, count=count, **kwargs):
            if rec.index in wanted:
                found[rec.index] = rec
                if len(found) == len(wanted):
                    break
    except FileNotFoundError:
        raise ValueError(f"--input {path}: no such file") from None
    except InputError as e:
        raise ValueError(f"--input {e}") from None
    except NotRegularFile as e:
        raise ValueError(str(e)) from None
    except OSError as e:  # unreadable
        raise ValueError(f"--input {path}: {e.strerror or e}") from None
    missing = next((i for i in indexes if i not in found), None)
    if missing is not None:
        n = count.total
        raise ValueError(f"--index {missing} is out of range: {path} holds {n} records (0..{n - 1})")
    return [found[i] for i in indexes]


def _format_of(record: object, fmt: str) -> str:
    """`auto`: caption records are the ones with a caption and no conversation."""
    if fmt != "auto":
        return fmt
    is_caption = (
        isinstance(record, dict) and "conversations" not in record and ("caption" in record or "text" in record)
    )
    return "caption" if is_caption else "llava"


def _images(
    paths: List[str], images_dir: Path, max_pixels: int, index: int, max_image_bytes: int
) -> List[Tuple[bytes, int, int]]:
    out = []
    if paths:
        try:
            check_folder(images_dir, "--images")
        except NotAFolder as e:
            raise ValueError(f"{e}; --images is the folder the record's image paths are relative to") from None
    for name in paths:
        path = _image_path(images_dir, name, allow_outside=True)
        try:
            data = _read_file(path, max_image_bytes)
        except NotRegularFile as e:
            raise ValueError(f"--index {index}: image {e}; prepare skips this record as image_not_a_file") from None
        except FileTooLarge as e:
            raise ValueError(
                f"--index {index}: image {e} (--max-image-bytes); prepare skips this record as image_file_too_big"
            ) from None
        except OSError as e:
            raise ValueError(
                f"--images {images_dir}: cannot read {name!r} ({path}): {e.strerror or e}; --images is the folder "
                "the record's image paths are relative to"
            ) from None
        try:
            out.append((data, *read_image_size(data, max_pixels=max_pixels)))
        except ImageError as e:
            raise ValueError(f"--index {index}: image {path}: {e}; the trainer skips this sample") from None
    return out


def show_records(
    input_path: Path,
    tokenizer_dir: Path,
    indexes: Sequence[int],
    *,
    images_dir: Optional[Path] = None,
    fmt: str = "auto",
    template: str = DEFAULT_TEMPLATE,
    system_prompt: Optional[str] = None,
    min_tiles: int = 1,
    max_tiles: int = 6,
    use_thumbnail: bool = True,
    tokens_per_tile: int = TOKENS_PER_TILE,
    seq_length: Optional[int] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
) -> Tuple[Tokenizer, Iterator[Shown]]:
    """Records `indexes` of `input_path` as the trainer would tokenize them (module docstring).

    Arguments, the input file and the tokenizer are checked before this returns; each record is rendered
    when the iterator reaches it (a record that cannot be rendered raises ValueError there)."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"--max-tiles must be at least {min_tiles} (the fewest tiles), got {max_tiles}")
    if tokens_per_tile < 1:
        raise ValueError(f"--tokens-per-tile must be positive, got {tokens_per_tile}")
    if seq_length is not None and seq_length < 1:
        raise ValueError(f"--seq-length must be positive, got {seq_length}")
    for flag, value in (("--max-image-bytes", max_image_bytes), ("--max-text-chars", max_text_chars)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if not indexes:
        raise ValueError("--index names no record")
    input_path = Path(input_path)
    images_dir = input_path.parent if images_dir is None else Path(images_dir)
    recs = _records(input_path, indexes)
    try:
        get_template(template)
    except ValueError as e:
        raise ValueError(f"--template: {e}") from None
    chat = ChatTemplate(_load_tokenizer(Path(tokenizer_dir)), tokens_per_tile, system_prompt, template)

    def render(rec: Record) -> Shown:
        index = rec.index
        try:
            meta, paths, _ = _normalize(rec.value, _format_of(rec.value, fmt))
        except _Skip as s:
            raise ValueError(f"--index {index}: record {rec.source} is not usable: {s.reason}: {s.detail}") from None
        chars = text_chars(meta)
        if chars > max_text_chars:
            raise ValueError(
                f"--index {index}: record {rec.source} has {chars} characters of text, more than {max_text_chars} "
                "(--max-text-chars); prepare skips it as text_too_long"
            )
        images = _images(paths, images_dir, max_pixels, index, max_image_bytes)
        plans = [plan_tiles(w, h, min_tiles, max_tiles, TILE_SIZE, use_thumbnail) for _, w, h in images]
        turns = [(t["role"], t["text"]) for t in meta["turns"]]
        data = [d for d, _, _ in images]
        sample = VLSample(__key__=rec.source, __restore_key__=(), kind=meta["kind"], turns=turns, images=data)
        try:
            enc = chat.encode(sample, data, plans, seq_length or _NO_LIMIT)
        except (SkipReason, MalformedSample) as e:
            raise ValueError(f"--index {index}: the trainer skips record {rec.source}: {e}") from None
        ids = enc.tokens.tolist() + enc.labels[-1:].tolist()
        return Shown(
            source=rec.source,
            template=template,
            tokens_per_tile=tokens_per_tile,
            input_ids=ids,
            loss_mask=[0] + [int(t) for t in enc.loss_mask.tolist()],  # the first id is never a target
            plans=enc.plans,
            notes=dict(enc.notes),
        )

    return chat.tok, (render(rec) for rec in recs)


def show_record(input_path: Path, tokenizer_dir: Path, *, index: int = 0, **kwargs) -> Tuple[Shown, Tokenizer]:
    """Record `index` of `input_path` as the trainer would tokenize it (`show_records`' keyword arguments)."""
    tok, shown = show_records(input_path, tokenizer_dir, [index], **kwargs)
    return next(shown), tok


def segments(shown: Shown, tok: Tokenizer) -> List[Segment]:
    """The sequence cut into image blocks and runs of text that are all trained or all not."""
    ids, out, i = shown.input_ids, [], 0
    while i < len(ids):
        if ids[i] == tok.ids.img_start and tok.ids.img_end in ids[i:]:
            end = ids.index(tok.ids.img_end, i)
            block = ids[i : end + 1]
            out.append(Segment(block, image_tokens=block.count(tok.ids.img_context)))
            i = end + 1
            continue
        trained = bool(shown.loss_mask[i])
        if out and out[-1].image_tokens is None and out[-1].trained == trained:
            out[-1].ids.append(ids[i])
        else:
            out.append(Segment([ids[i]], trained))
        i += 1
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _image_text(seg: Segment, tokens_per_tile: int) -> str:
    return f"<img><IMG_CONTEXT>x{seg.image_tokens} ({_count(seg.image_tokens // tokens_per_tile, 'tile')})</img>"


def render_text(shown: Shown, tok: Tokenizer, marks: Optional[str] = None) -> str:
    """Decoded text with special tokens visible and image blocks abbreviated. marks: None (plain),
    'color' (trained text in green) or 'brackets' (trained text between [[ and ]])."""
    parts = []
    for seg in segments(shown, tok):
        if seg.image_tokens is not None:
            parts.append(_image_text(seg, shown.tokens_per_tile))
            continue
        text = tok.decode(seg.ids)
        if seg.trained and marks == "color":
            text = f"{_GREEN}{text}{_RESET}"
        elif seg.trained and marks == "brackets":
            text = f"{OPEN}{text}{CLOSE}"
        parts.append(text)
    return "".join(parts)


def summary(shown: Shown) -> str:
    line = (
        f"{shown.source}: {len(shown.input_ids)} tokens, {sum(shown.loss_mask)} trained, "
        f"{_count(shown.num_tiles, 'tile')} in {_count(len(shown.plans), 'image')} (template {shown.template})"
    )
    notes = ", ".join(f"{what} {n}" for what, n in sorted(shown.notes.items()))
    return f"{line}; over --seq-length: {notes}" if notes else line


def report(shown: Shown, tok: Tokenizer, *, as_json: bool = False, color: bool = False) -> str:
    """What `sail-data show` prints: the marked text and a summary line, or a JSON object."""
    if as_json:
        text = render_text(shown, tok)
        return json.dumps(
            {"input_ids": shown.input_ids, "loss_mask": shown.loss_mask, "text": text}, ensure_ascii=False
        )
    body = render_text(shown, tok, "color" if color else "brackets")
    return f"{body}\n{'-' * 40}\n{summary(shown)}"
