"""Streaming safetensors I/O: read one tensor at a time, write planned shards tensor by tensor.

Why not `safe_open` / `save_file`: safe_open maps whole files, and the pages it touches stay in this
process's resident memory until the file is closed, so reading a 4 GB checkpoint into a 4 GB model
peaks at twice its size; save_file wants a whole shard in memory at once. Here a tensor is read with
pread into its own buffer (nothing stays mapped), and a shard's header is written from a plan up front
so each tensor goes to disk as soon as it exists. Files are standard safetensors (any reader takes them).
"""

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch

from sail_megatron.convert.errors import raise_if

INDEX_NAME = "model.safetensors.index.json"
_CHUNK = 256 << 20  # bytes per pread/pwrite call (Linux moves at most ~2 GiB per call)
_HEADER_LIMIT = 100 << 20

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range [start, end) of `file`."""

    file: Path
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_header(path: Path, problems: List[str]) -> Dict[str, TensorInfo]:
    """The tensors of one safetensors file; appends to `problems` what is corrupt."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            problems.append(f"{path.name}: too short to be a safetensors file ({size} bytes)")
            return {}
        (n,) = struct.unpack("<Q", head)
        if n > min(_HEADER_LIMIT, size - 8):
            problems.append(f"{path.name}: header length {n} does not fit the file ({size} bytes)")
            return {}
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"{path.name}: unreadable header ({e})")
            return {}
    base = 8 + n
    out: Dict[str, TensorInfo] = {}
    cut: List[Tuple[int, str]] = []  # tensors past the end: one truncation, reported once
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(meta.get("dtype"))
        shape = tuple(meta.get("shape", ()))
        begin, end = meta.get("data_offsets", (0, -1))
        if dtype is None:
            problems.append(f"{path.name}: {name} has unsupported dtype {meta.get('dtype')!r}")
            continue
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize:
            problems.append(
                f"{path.name}: {name} spans {end - begin} bytes, but {shape} x {dtype} needs {numel * dtype.itemsize}"
            )
            continue
        if base + end > size:
            cut.append((base + end, name))
            continue
        out[name] = TensorInfo(path, dtype, shape, base + begin, base + end)
    if cut:
        end, name = min(cut)
        problems.append(
            f"{path.name}: {name} ends at byte {end}, past the end of the file ({size} bytes): the file is truncated"
        )
    return out


class SafetensorsFolder:
    """The safetensors tensors of a Hugging Face folder (`model.safetensors.index.json` or *.safetensors),
    read one at a time. Raises ConversionError listing every problem of the folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        problems: List[str] = []
        index = self.folder / INDEX_NAME
        weight_map: Optional[Dict[str, str]] = None
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise_if([f"{index} is not a valid index ({e})"], f"cannot read the checkpoint in {self.folder}")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.folder.glob("*.bin"))
            problems.append(
                f"no safetensors files in {self.folder}"
                + (
                    f" (found {bins[:3]}: PyTorch .bin checkpoints are not read; save with safe_serialization=True)"
                    if bins
                    else ""
                )
            )
        self.tensors: Dict[str, TensorInfo] = {}
        damaged: Set[str] = set()
        for name in files:
            path = self.folder / name
            if not path.is_file():
                problems.append(f"{name} is listed in {INDEX_NAME} but does not exist")
                continue
            before = len(problems)
            for tname, info in read_header(path, problems).items():
                if tname in self.tensors:
                    problems.append(f"{tname} is stored twice ({self.tensors[tname].file.name} and {name})")
                self.tensors[tname] = info
            if len(problems) > before:
                damaged.add(name)
        if weight_map is not None:
            problems += _index_problems(self.folder, weight_map, self.tensors, damaged)
        raise_if(problems, f"cannot read the checkpoint in {self.folder}")
        self._fds: Dict[Path, int] = {}

    @property
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {n: i.shape for n, i in self.tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        """A fresh tensor holding `name`'s data (nothing stays mapped)."""
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes == 0:
            return out
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        view = _byte_view(out)
        pos = 0
        while pos < info.nbytes:
            got = os.preadv(fd, [view[pos : pos + _CHUNK]], info.start + pos)
            if got <= 0:
                raise OSError(f"{info.file}: unexpected end of file while reading {name}")
            pos += got
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _index_problems(
    folder: Path, weight_map: Dict[str, str], tensors: Dict[str, TensorInfo], damaged: Set[str]
) -> List[str]:
    """Index entries the files do not back. The tensors a damaged file loses follow from its own problem,
    so they are counted in one line per file rather than listed."""
    problems, lost = [], {}
    for tname, fname in sorted(weight_map.items()):
        info = tensors.get(tname)
        if info is None and fname in damaged:
            lost[fname] = lost.get(fname, 0) + 1
        elif info is None and (folder / fname).is_file():
            problems.append(f"{tname} is listed in {INDEX_NAME} under {fname} but that file lacks it")
        elif info is not None and info.file.name != fname:
            problems.append(f"{tname} is listed under {fname} but stored in {info.file.name}")
    problems += [f"and {n} tensor(s) that {fname} should hold (listed in {INDEX_NAME})" for fname, n in lost.items()]
    return problems


PlanEntry = Tuple[str, torch.dtype, Tuple[int, ...]]
_SIZE_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}


def parse_size(text) -> int:
    """'4GB', '500MB', '2GiB' or a byte count -> a positive number of bytes. ValueError otherwise."""
    t, factor = str(text).strip().lower(), 1
    for unit, unit_factor in _SIZE_UNITS.items():
        if t.endswith(unit):
            t, factor = t[: -len(unit)].strip(), unit_factor
            break
    try:
        size = float(t) * factor
    except ValueError:
        size = math.nan
    if not math.isfinite(size) or size < 1:
        raise ValueError(
            f"{text!r} is not a shard size: use a positive byte count or a number with KB, MB, GB, "
            "KiB, MiB or GiB (e.g. 5GB)"
        )
    return int(size)


class ShardedSafetensorsWriter:
    """Writes the planned tensors into `model-0000i-of-0000N.safetensors` shards plus the index.

    Each shard's header is written up front from the plan, so `write` puts a tensor's bytes in place
    right away and nothing accumulates in memory; `close` checks that every planned tensor arrived.
    """

    def __init__(
        self, folder: Path, plan: Sequence[PlanEntry], max_shard_bytes: int = 4 << 30, file_name: Optional[str] = None
    ):
        """`file_name`: write one file of that name and no index instead of numbered shards."""
        self.folder = Path(folder)
        self.single = file_name is not None
        shards: List[List[PlanEntry]] = [[]]
        size = 0
        for entry in plan:
            nbytes = _numel(entry[2]) * entry[1].itemsize
            if shards[-1] and size + nbytes > max_shard_bytes and not self.single:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self.slots: Dict[str, Tuple[int, int, torch.dtype, Tuple[int, ...]]] = {}
        self.weight_map: Dict[str, str] = {}
        self.fds: List[int] = []
        self.total = 0
        for i, shard in enumerate(shards):
            fname = file_name if self.single else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, dtype, shape in shard:
                nbytes = _numel(shape) * dtype.itemsize
                header[name] = {
                    "dtype": DTYPE_CODES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the format allows space padding; keeps data 8-byte aligned
            fd = os.open(self.folder / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            try:
                os.write(fd, struct.pack("<Q", len(raw)) + raw)
                os.ftruncate(fd, 8 + len(raw) + offset)
            except BaseException:
                self.abandon()
                raise
            base = 8 + len(raw)
            for name, dtype, shape in shard:
                begin, end = header[name]["data_offsets"]
                self.slots[name] = (len(self.fds) - 1, base + begin, dtype, tuple(shape))
                self.weight_map[name] = fname
                self.total += end - begin
        self.written: set = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.slots:
            raise KeyError(f"{name} is not in the write plan")
        if name in self.written:
            raise KeyError(f"{name} was written twice")
        shard, offset, dtype, shape = self.slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: planned {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        view = _byte_view(tensor.contiguous())
        pos = 0
        while pos < len(view):
            pos += os.pwrite(self.fds[shard], view[pos : pos + _CHUNK], offset + pos)
        self.written.add(name)

    def abandon(self) -> None:
        """After a failed write: close the files (their space is freed once the caller removes them)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def close(self) -> None:
        """Checks completeness, then writes the index (unless writing a single file)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        missing = sorted(set(self.slots) - self.written)
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[:5]}")
        if self.single:
            return
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
