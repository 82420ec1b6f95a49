"""Reading the records of a `sail-data prepare` input file: a JSON array (`.json`) or JSON Lines.

Text is UTF-8, with or without a byte-order mark; suffixes are matched in any case. Problems with the
file as a whole (not UTF-8, one JSON document spread over many lines where records are expected) are
an `InputError` naming the file, the line and the fix. A line that is not valid JSON is a record of its
own (the parse error), so the caller can report it and go on.

Records are numbered from 0 in file order (blank lines are not records); with `num_shards` N only the
records whose number is `shard_index` modulo N are parsed and returned, so N machines that run the same
command with shard indexes 0..N-1 together see every record exactly once.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Union

_UTF8_BOM = b"\xef\xbb\xbf"
_OTHER_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


class InputError(ValueError):
    """The input file cannot be read as records at all."""


@dataclass(frozen=True)
class Record:
    index: int  # 0-based position among all records of the file
    source: str  # file:line for JSON Lines, file:[i] for a JSON array
    value: Union[object, json.JSONDecodeError]  # the parsed JSON, or why the line did not parse


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
    if path.stat().st_size > _WHOLE_DOCUMENT_LIMIT:
        raise InputError(top)
    try:
        doc = json.loads(path.read_bytes().removeprefix(_UTF8_BOM).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
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


def _json_array(path: Path, num_shards: int, shard_index: int) -> Iterator[Record]:
    data = path.read_bytes().removeprefix(_UTF8_BOM)
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
    if not isinstance(records, list):
        raise InputError(f"{path}: the top level must be a JSON array of records, got {type(records).__name__}")
    for i in range(shard_index, len(records), num_shards):
        yield Record(i, f"{path.name}:[{i}]", records[i])


def _json_lines(path: Path, f: BinaryIO, num_shards: int, shard_index: int) -> Iterator[Record]:
    index = 0
    for n, raw in enumerate(f, start=1):
        if n == 1:
            raw = raw.removeprefix(_UTF8_BOM)
        line = _decode(path, raw, n)  # every line, so all shards fail alike on a bad file
        if not line.strip():
            continue
        mine = index % num_shards == shard_index
        if mine or index == 0:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                if index == 0 and line.strip() in ("[", "{"):
                    _whole_document_error(path, line.strip())
                value = e
            if mine:
                yield Record(index, f"{path.name}:{n}", value)
        index += 1


def read_records(path: Path, num_shards: int = 1, shard_index: int = 0) -> Iterator[Record]:
    """The records of `path` that belong to shard `shard_index` of `num_shards` (module docstring)."""
    check_shard(num_shards, shard_index)
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4096)
        _check_encoding(path, head)
        is_array = path.suffix.lower() == ".json" and head.removeprefix(_UTF8_BOM).lstrip().startswith(b"[")
        if is_array:
            yield from _json_array(path, num_shards, shard_index)
            return
        f.seek(0)
        yield from _json_lines(path, f, num_shards, shard_index)
