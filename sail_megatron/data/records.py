"""Reading the records of a `sail-data prepare` input file: a JSON array (`.json`) or JSON Lines.

Text is UTF-8, with or without a byte-order mark; suffixes are matched in any case. Problems with the
file as a whole (not UTF-8, one JSON document spread over many lines where records are expected) are
an `InputError` naming the file, the line and the fix. A line that is not valid JSON is a record of its
own (the parse error), so the caller can report it and go on.

Records are numbered from 0 in file order (blank lines are not records); with `num_shards` N only the
records whose number is `shard_index` modulo N are parsed and returned, so N machines that run the same
command with shard indexes 0..N-1 together see every record exactly once.

Bounds: the file must be a regular file (`input_files.py`). A JSON Lines record is never read past
`max_record_bytes` (the line is skipped up to its end and becomes a `RecordProblem`); a record nested deeper
than `MAX_JSON_DEPTH` levels is a `RecordProblem` too, so no later code can recurse into it without end. A
`.json` array is one JSON document and is read whole.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

from sail_megatron.data.input_files import open_regular, read_regular

DEFAULT_MAX_RECORD_BYTES = 32 << 20
"""A JSON Lines record longer than this (32 MiB) is skipped unread (`--max-record-bytes`)."""
MAX_JSON_DEPTH = 100
"""Records nest 4 levels (record, conversations, turn, text); deeper ones are skipped."""

_UTF8_BOM = b"\xef\xbb\xbf"
_OTHER_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


class InputError(ValueError):
    """The input file cannot be read as records at all."""


class RecordProblem(Exception):
    """A record that is not parsed at all (too large, too deeply nested); `reason` is its counter name."""

    def __init__(self, reason: str, detail: str, id: Optional[str] = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.id = reason, detail, id  # id: the record's, when it was read


@dataclass(frozen=True)
class EmbeddedImage:
    """An image carried inside its record (a parquet row's bytes) instead of a path under --images."""

    data: bytes = field(repr=False)
    name: str  # where it came from, for messages: the file name the row gives, or column[row][i]


@dataclass(frozen=True)
class Record:
    index: int  # 0-based position among all records of the file
    source: str  # file:line for JSON Lines, file:[i] for a JSON array
    value: Union[object, json.JSONDecodeError, RecordProblem]  # the parsed JSON, or why it was not parsed


@dataclass
class RecordCount:
    """Filled in by `read_records`: how many records the file holds (all shards), once it is read."""

    total: int = 0


def check_shard(num_shards: int, shard_index: int) -> None:
    if num_shards < 1:
        raise ValueError(f"--num-shards must be at least 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"--shard-index must be in 0..{num_shards - 1} for --num-shards {num_shards}, got {shard_index}"
        )


def _decode(path: Path, raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path} line {line} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name}"
        ) from None


def _check_encoding(path: Path, head: bytes) -> None:
    for bom, name in _OTHER_BOMS.items():
        if head.startswith(bom):
            raise InputError(
                f"{path} is {name} (it starts with a {name} byte-order mark); re-encode it as UTF-8, "
                f"e.g. iconv -f {name} -t utf-8 {path.name}"
            )


_WHOLE_DOCUMENT_LIMIT = 1 << 28  # parsed whole only to explain the error; larger files get the short answer


def _whole_document_error(path: Path, opener: str) -> None:
    """Raise a clear error for a file that is one JSON document (an array or object over many lines);
    `opener` is its first line, a lone '[' or '{' that no JSON Lines file starts with."""
    spread = (
        f"{path} holds one JSON array spread over several lines, but JSON Lines needs one complete "
        f"record per line; rename it to {path.stem}.json, or write one record per line: "
        f"jq -c '.[]' {path.name}"
    )
    if opener == "[":
        raise InputError(spread)
    top = (
        f"{path} holds a single JSON object at the top level; the top level must be a JSON array of "
        "records (.json) or one record per line (.jsonl)"
    )
    try:
        doc = json.loads(read_regular(path, _WHOLE_DOCUMENT_LIMIT).removeprefix(_UTF8_BOM).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InputError(top) from None
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        hint = (
            f"; the records are probably under {lists[0]!r}: jq '.{lists[0]}' {path.name} > records.json"
            if lists
            else ""
        )
        keys = ", ".join(map(str, list(doc)[:5]))
        raise InputError(
            f"{path} holds a single JSON object (keys: {keys}); the top level must be a JSON array "
            f"of records (.json) or one record per line (.jsonl){hint}"
        )
    raise InputError(top)


def _too_deep(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` nests lists and objects more than `limit` levels deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


_TOO_DEEP = f"JSON nested more than {MAX_JSON_DEPTH} levels deep"


def _parse(text: str) -> object:
    """One record's JSON; a JSONDecodeError or RecordProblem as the value when it is not a usable record."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return e
    except RecursionError:  # the decoder's own guard, far below the C stack's end: nothing is damaged
        return RecordProblem("record_too_deep", _TOO_DEEP)
    # Cheap first: a record cannot nest deeper than its count of brackets.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _too_deep(value):
        return RecordProblem("record_too_deep", _TOO_DEEP)
    return value


def _json_array(
    path: Path, f: BinaryIO, num_shards: int, shard_index: int, count: Optional[RecordCount]
) -> Iterator[Record]:
    data = f.read().removeprefix(_UTF8_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(
            f"{path} line {line} is not UTF-8 (byte 0x{data[e.start]:02x}); re-encode the file "
            f"as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name}"
        ) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise InputError(f"{path} is not usable: its {_TOO_DEEP}") from None
    if not isinstance(records, list):
        raise InputError(f"{path}: the top level must be a JSON array of records, got {type(records).__name__}")
    for i in range(shard_index, len(records), num_shards):
        value = records[i]
        if isinstance(value, (dict, list)) and _too_deep(value):
            value = RecordProblem("record_too_deep", _TOO_DEEP)
        yield Record(i, f"{path.name}:[{i}]", value)
    if count is not None:
        count.total = len(records)


def _lines(f: BinaryIO, max_bytes: int) -> Iterator[Optional[bytes]]:
    """The lines of `f`, each read only if it holds at most `max_bytes` bytes; None for a longer one (the
    rest of it is skipped in bounded reads)."""
    while True:
        raw = f.readline(max_bytes + 1)
        if not raw:
            return
        if len(raw) <= max_bytes or raw.endswith(b"\n"):
            yield raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(1 << 20)
        yield None


def _json_lines(
    path: Path, f: BinaryIO, num_shards: int, shard_index: int, max_bytes: int, count: Optional[RecordCount]
) -> Iterator[Record]:
    index = 0
    for n, raw in enumerate(_lines(f, max_bytes), start=1):
        if raw is None:
            value: object = RecordProblem(
                "record_too_large", f"the line holds more than {max_bytes} bytes (--max-record-bytes); not read"
            )
            mine = index % num_shards == shard_index
        else:
            if n == 1:
                raw = raw.removeprefix(_UTF8_BOM)
            line = _decode(path, raw, n)  # every line, so all shards fail alike on a bad file
            if not line.strip():
                continue
            mine = index % num_shards == shard_index
            if mine or index == 0:
                value = _parse(line)
                if index == 0 and isinstance(value, json.JSONDecodeError) and line.strip() in ("[", "{"):
                    _whole_document_error(path, line.strip())
        if mine:
            yield Record(index, f"{path.name}:{n}", value)
        index += 1
    if count is not None:
        count.total = index


def read_records(
    path: Path,
    num_shards: int = 1,
    shard_index: int = 0,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    count: Optional[RecordCount] = None,
) -> Iterator[Record]:
    """The records of `path` that belong to shard `shard_index` of `num_shards` (module docstring).

    count: set to the number of records in the whole file once the iterator is exhausted."""
    check_shard(num_shards, shard_index)
    if max_record_bytes < 1:
        raise ValueError(f"--max-record-bytes must be at least 1, got {max_record_bytes}")
    path = Path(path)
    with open_regular(path, "--input") as f:
        head = f.read(4096)
        _check_encoding(path, head)
        is_array = path.suffix.lower() == ".json" and head.removeprefix(_UTF8_BOM).lstrip().startswith(b"[")
        f.seek(0)
        if is_array:
            yield from _json_array(path, f, num_shards, shard_index, count)
            return
        yield from _json_lines(path, f, num_shards, shard_index, max_record_bytes, count)
