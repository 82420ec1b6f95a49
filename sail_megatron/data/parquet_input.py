"""Parquet files whose rows carry their images, as `sail-data prepare --input FILE.parquet` reads them.

Most SFT sets on the Hugging Face hub ship so: one column of images, each a Hugging Face `Image` struct
`{bytes, path}` or plain binary (one image, or a list of them per row), and a column of conversations or of
captions. Conversations are a list of turns, LLaVA's `{from, value}` or OpenAI's `{role, content}` (content a
string or a list of text and image parts), or the same as a JSON string; rows become the records that
`prepare` writes from JSON, with the images' bytes in place of paths (`records.EmbeddedImage`).

Columns: named by flags (`--image-column`, `--text-column`, `--caption-column`, `--id-column`), or detected
from the schema (the image column by its type; the text and caption columns by the usual names; see
`resolve_columns`); prepare prints what it uses. `--image-column none` reads text-only conversations.

Memory: the file is read one row group at a time (`ParquetFile.iter_batches` over that row group alone), and
rows become Python objects `BATCH_ROWS` at a time; `prepare` holds at most its read-ahead window of records.
What is held at once is bounded by the largest row group, not by the file (`ParquetRecords.rows_held_max`
and `row_groups_read` say what a read held).

Rows whose images are not embedded (a struct with only a path) are skipped as `image_not_embedded`; a row
with a text column that is neither a list of turns nor JSON of one is a `malformed_line`, as in JSON input.
pyarrow is needed only here; without it the error says how to install it.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from sail_megatron.data.input_files import open_regular
from sail_megatron.data.records import EmbeddedImage, Record, RecordCount, RecordProblem, check_shard

PARQUET_SUFFIXES = (".parquet", ".pq")
BATCH_ROWS = 16
"""Rows turned into Python objects at a time."""
NONE = "none"
_IMAGE_NAMES = ("images", "image", "img", "jpg", "png", "webp")
_TEXT_NAMES = ("conversations", "messages", "conversation", "dialog", "chat")
_CAPTION_NAMES = ("caption", "text", "captions", "txt", "alt_text", "description")
PYARROW_FIX = "reading parquet needs pyarrow: pip install pyarrow==26.0.1 (in the project's environment)"


def is_parquet(path: Path) -> bool:
    return Path(path).suffix.lower() in PARQUET_SUFFIXES


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ValueError(PYARROW_FIX) from None
    return pyarrow


@dataclass(frozen=True)
class ParquetColumns:
    """Which column holds what; None: detect it (`resolve_columns`); `none` for the image column: no images."""

    image: Optional[str] = None
    text: Optional[str] = None  # conversations
    caption: Optional[str] = None
    id: Optional[str] = None


@dataclass(frozen=True)
class ResolvedColumns:
    image: Optional[str]
    text: Optional[str]
    caption: Optional[str]
    id: Optional[str]
    fmt: str  # llava (conversations) or caption
    image_kind: str  # how the image column stores images, for the printed note

    def used(self) -> List[str]:
        return [c for c in (self.image, self.text if self.fmt == "llava" else self.caption, self.id) if c]

    def describe(self) -> dict:
        doc = {"format": self.fmt, "image": self.image, "image_kind": self.image_kind, "id": self.id}
        doc["conversations" if self.fmt == "llava" else "caption"] = self.text if self.fmt == "llava" else self.caption
        return doc


def _image_kind(t) -> Optional[str]:
    """How a column of arrow type `t` holds images, or None when it cannot."""
    pa = _pyarrow()

    def single(t) -> Optional[str]:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return "binary"
        if pa.types.is_struct(t):
            names = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
            b = names.get("bytes")
            if b is not None and (pa.types.is_binary(b) or pa.types.is_large_binary(b)):
                return "Hugging Face image struct {bytes, path}"
        return None

    if pa.types.is_list(t) or pa.types.is_large_list(t):
        one = single(t.value_type)
        return f"list of {one}" if one else None
    return single(t)


def _is_text(t, lists: bool) -> bool:
    pa = _pyarrow()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return True
    return lists and (pa.types.is_list(t) or pa.types.is_large_list(t))


def resolve_columns(schema, given: ParquetColumns, fmt: Optional[str], path: Path) -> ResolvedColumns:
    """The columns to read: those given, else the image column by type (preferring the usual names), the
    conversations among conversations/messages/..., the caption among caption/text/...; the format is
    `fmt`, else llava when there is a conversations column, else caption."""
    names = list(schema.names)
    listing = ", ".join(f"{n} ({schema.field(n).type})" for n in names)

    def named(flag: str, name: Optional[str]) -> Optional[str]:
        if name is not None and name != NONE and name not in names:
            raise ValueError(f"{flag} {name!r} is not a column of {path}; its columns: {listing}")
        return name

    image, text, caption = named("--image-column", given.image), named("--text-column", given.text), None
    caption = named("--caption-column", given.caption)
    id_column = named("--id-column", given.id) or ("id" if "id" in names else None)
    if image is None:
        candidates = [n for n in names if _image_kind(schema.field(n).type)]
        preferred = [n for n in _IMAGE_NAMES if n in candidates]
        image = (preferred or candidates or [None])[0]
    if image is not None and image != NONE and not _image_kind(schema.field(image).type):
        raise ValueError(f"--image-column {image!r} of {path} holds {schema.field(image).type}, not image bytes")
    if text is None and fmt != "caption":
        text = next((n for n in _TEXT_NAMES if n in names and _is_text(schema.field(n).type, True)), None)
    if caption is None and (fmt == "caption" or text is None):
        caption = next((n for n in _CAPTION_NAMES if n in names and _is_text(schema.field(n).type, False)), None)
    fmt = fmt or ("llava" if text is not None else "caption" if caption is not None else None)
    if fmt is None or (fmt == "llava" and text is None) or (fmt == "caption" and caption is None):
        what = "--caption-column" if fmt == "caption" else "--text-column (conversations) or --caption-column"
        raise ValueError(
            f"found no {'caption' if fmt == 'caption' else 'text'} column in {path}; give {what}. Columns: {listing}"
        )
    if image is None:
        raise ValueError(
            f"found no column of image bytes in {path} (binary, or Hugging Face image structs, or lists of "
            f"them); give --image-column, or --image-column none for text-only rows. Columns: {listing}"
        )
    image = None if image == NONE else image
    if fmt == "caption" and image is None:
        raise ValueError("captions need images: --image-column none reads text-only conversations only")
    kind = _image_kind(schema.field(image).type) if image else "none"
    return ResolvedColumns(image, text, caption, id_column, fmt, kind)


def _images(value: object, where: str) -> List[EmbeddedImage]:
    """The embedded images of one cell; RecordProblem when one is not embedded."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        name = f"{where}[{i}]" if isinstance(value, list) else where
        if isinstance(item, dict):
            data, path = item.get("bytes"), item.get("path")
            if data is None:
                raise RecordProblem("image_not_embedded", f"{name}: the row names {path!r} but carries no image bytes")
            name = f"{name} ({path})" if path else name
        else:
            data = item
        if not isinstance(data, (bytes, bytearray)):
            raise RecordProblem("malformed_line", f"{name}: not image bytes ({type(data).__name__})")
        out.append(EmbeddedImage(bytes(data), name))
    return out


def _turns(value: object) -> object:
    """A conversations cell as a list of turns (JSON strings parsed), or what it is, for prepare to judge."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise RecordProblem("malformed_line", f"the conversations column holds text that is not JSON ({e})")
    return value


class ParquetRecords:
    """The rows of a parquet file as prepare's records, row group by row group (module docstring).

    Rows are numbered from 0 in file order; with `num_shards` N only rows i with i % N == `shard_index` are
    returned (row groups holding none of them are not read)."""

    def __init__(
        self,
        path: Path,
        columns: ResolvedColumns,
        num_shards: int = 1,
        shard_index: int = 0,
        count: Optional[RecordCount] = None,
        batch_rows: int = BATCH_ROWS,
    ):
        check_shard(num_shards, shard_index)
        self.path, self.columns, self.count = Path(path), columns, count
        self.num_shards, self.shard_index, self.batch_rows = num_shards, shard_index, batch_rows
        self.rows_held_max = 0  # most rows held as Python objects at once
        self.row_groups_read = 0

    def _record(self, row: dict, index: int) -> Record:
        c = self.columns
        source = f"{self.path.name}:row {index}"
        try:
            value: dict = {}
            if c.id is not None and row.get(c.id) is not None:
                value["id"] = str(row[c.id])
            if c.fmt == "llava":
                value["conversations"] = _turns(row.get(c.text))
            else:
                value["caption"] = row.get(c.caption)
            if c.image is not None:
                value["image"] = _images(row.get(c.image), f"{c.image}[row {index}]")
        except RecordProblem as p:
            p.id = value.get("id")
            return Record(index, source, p)
        return Record(index, source, value)

    def __iter__(self) -> Iterator[Record]:
        _pyarrow()
        import pyarrow.parquet as pq

        with open_regular(self.path, "--input") as f:
            pf = pq.ParquetFile(f)
            index = 0
            for group in range(pf.num_row_groups):
                rows = pf.metadata.row_group(group).num_rows
                first_mine = index + (self.shard_index - index) % self.num_shards
                if first_mine >= index + rows:  # none of this part's rows: not read
                    index += rows
                    continue
                self.row_groups_read += 1
                batches = pf.iter_batches(
                    batch_size=self.batch_rows, row_groups=[group], columns=self.columns.used(), use_threads=False
                )
                for batch in batches:
                    values = batch.to_pylist()
                    self.rows_held_max = max(self.rows_held_max, len(values))
                    for row in values:
                        if index % self.num_shards == self.shard_index:
                            yield self._record(row, index)
                        index += 1
                    del values
        if self.count is not None:
            self.count.total = index


def open_parquet(path: Path, given: ParquetColumns, fmt: Optional[str]) -> Tuple[ResolvedColumns, str]:
    """The columns to read from `path` and a line describing the file and them (for the summary)."""
    _pyarrow()
    import pyarrow.parquet as pq

    with open_regular(path, "--input") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow.ArrowInvalid and friends: not a parquet file
            raise ValueError(f"--input {path} is not a readable parquet file ({e})") from None
        columns = resolve_columns(pf.schema_arrow, given, fmt, Path(path))
        rows, groups = pf.metadata.num_rows, pf.num_row_groups
    c = columns
    text = f"conversations <- {c.text}" if c.fmt == "llava" else f"caption <- {c.caption}"
    images = f"images <- {c.image} ({c.image_kind})" if c.image else "no images (--image-column none)"
    ident = f", id <- {c.id}" if c.id else ""
    line = f"parquet {Path(path).name}: {rows} rows in {groups} row groups; format {c.fmt}: {images}, {text}{ident}"
    return columns, line
