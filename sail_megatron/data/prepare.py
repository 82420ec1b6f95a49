"""LLaVA-style conversations or caption JSONL + an image folder -> energon-ready WebDataset shards.

Every input record is either written or reported with the reason it was skipped (missing file,
unreadable image, malformed line, placeholder mismatch); nothing is dropped silently. Images are
checked from their headers (and fully decoded with `verify_decode`), and their sizes are stored.
"""

import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from tqdm import tqdm

from sail_megatron.data.image_io import ImageError, decode_rgb, read_image_size
from sail_megatron.data.sample import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FORMATS = ("llava", "caption")


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

    def by_reason(self) -> Counter:
        return Counter(s.reason for s in self.skipped)

    def summary(self) -> str:
        lines = [f"wrote {self.written} samples in {self.shards} shards; skipped {len(self.skipped)}"]
        lines += [f"  skipped {n:6d} x {reason}" for reason, n in sorted(self.by_reason().items())]
        lines += [f"  converted {n:6d} x {what}" for what, n in sorted(self.converted.items())]
        return "\n".join(lines)


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def _read_records(path: Path) -> Iterator[Tuple[str, object]]:
    """(source, record or the exception that parsing raised), for JSONL or a JSON array file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        for i, rec in enumerate(records):
            yield f"{path.name}:[{i}]", rec
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path.name}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path.name}:{n}", e


def _normalize(record: object, fmt: str) -> Tuple[dict, List[str], List[str]]:
    """Record -> (shard json without image info, image paths, conversions applied). Raises _Skip."""
    if isinstance(record, Exception):
        raise _Skip("malformed_line", str(record))
    if not isinstance(record, dict):
        raise _Skip("malformed_line", f"expected a JSON object, got {type(record).__name__}")
    images = record.get("image", record.get("images", []))
    images = [images] if isinstance(images, str) else list(images or [])
    if not all(isinstance(p, str) for p in images):
        raise _Skip("malformed_line", "image paths must be strings")
    if fmt == "caption":
        caption = record.get("caption", record.get("text"))
        if not isinstance(caption, str) or not caption.strip():
            raise _Skip("malformed_line", "no caption text")
        if not images:
            raise _Skip("malformed_line", "a caption record needs an image")
        return {"kind": "caption", "turns": [{"role": "caption", "text": caption.strip()}]}, images, []
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise _Skip("malformed_line", "no conversations list")
    turns = []
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise _Skip("malformed_line", f"bad turn {turn!r:.80}")
        turns.append({"role": _ROLES[turn["from"]], "text": turn["value"]})
    if not any(t["role"] == "assistant" for t in turns):
        raise _Skip("malformed_line", "no assistant turn to train on")
    placeholders = sum(t["text"].count(IMAGE_PLACEHOLDER) for t in turns)
    conversions = []
    if placeholders == 0 and images:
        # LLaVA/InternVL convention: images without placeholders go before the first user text.
        first_user = next(t for t in turns if t["role"] == "user")
        first_user["text"] = "\n".join([IMAGE_PLACEHOLDER] * len(images)) + "\n" + first_user["text"]
        conversions.append("added_image_placeholders")
    elif placeholders != len(images):
        raise _Skip("placeholder_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
    return {"kind": "conversation", "turns": turns}, images, conversions


def _load_image(path: Path, max_pixels: int, verify_decode: bool) -> Tuple[bytes, int, int]:
    if not path.is_file():
        raise _Skip("missing_image", str(path))
    data = path.read_bytes()
    try:
        width, height = read_image_size(data, max_pixels=max_pixels)
        if verify_decode:
            decode_rgb(data, max_pixels=max_pixels)
    except ImageError as e:
        raise _Skip(f"image_{e.reason}", f"{path}: {e}")
    return data, width, height


def _extension(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return {"jpeg": "jpg"}.get(ext, ext) or "img"


class _ShardWriter:
    """Deterministic tar shards of `shard_size` samples (fixed mtimes and ownership)."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.count, self.shards, self._tar = 0, 0, None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, meta: dict, images: List[Tuple[bytes, str]]) -> None:
        if self.count % self.shard_size == 0:
            self.close()
            self._tar = tarfile.open(self.out_dir / f"shard-{self.shards:06d}.tar", "w", format=tarfile.USTAR_FORMAT)
            self.shards += 1
        key = f"{self.count:09d}"  # sortable and dot-free: WebDataset splits keys at the first dot
        self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())
        for i, (data, ext) in enumerate(images):
            self._add(f"{key}.img{i}.{ext}", data)
        self.count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def run_energon_prepare(out_dir: Path, split_ratio: str) -> None:
    """energon's own preparation (index + split + dataset.yaml for cooked crude samples)."""
    cmd = [sys.executable, "-m", "megatron.energon.cli.main", "prepare", str(out_dir), "--non-interactive",
           "--split-ratio", split_ratio, "--sample-type", "CrudeWebdataset", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"energon prepare failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def prepare(input_path: Path, images_dir: Path, out_dir: Path, fmt: str = "llava", shard_size: int = 1000,
            split_ratio: str = "1,0,0", max_pixels: int = 64_000_000, verify_decode: bool = False,
            workers: int = 8, overwrite: bool = False, progress: bool = True) -> PrepareReport:
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if shard_size < 1:
        raise ValueError("--shard-size must be at least 1")
    input_path, images_dir, out_dir = Path(input_path), Path(images_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PrepareReport()
    writer = _ShardWriter(out_dir, shard_size)

    def load(item):
        source, record = item
        try:
            meta, paths, conversions = _normalize(record, fmt)
            loaded = [_load_image(images_dir / p, max_pixels, verify_decode) for p in paths]
        except _Skip as s:
            rid = record.get("id") if isinstance(record, dict) else None
            return source, None, SkippedRecord(source, None if rid is None else str(rid), s.reason, s.detail)
        meta["conversions"] = conversions
        meta.update(source=source, id=record.get("id"), num_images=len(loaded),
                    images=[{"width": w, "height": h, "format": _extension(p)} for (_, w, h), p in zip(loaded, paths)])
        return source, (meta, [(d, _extension(p)) for (d, _, _), p in zip(loaded, paths)]), None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        # map() keeps input order, so shards are deterministic whatever the thread timing.
        for source, item, skipped in tqdm(pool.map(load, _read_records(input_path)), desc="prepare",
                                          unit=" records", disable=not progress):
            if skipped is not None:
                report.skipped.append(skipped)
                logger.warning("skipped %s (id %s): %s: %s", skipped.source, skipped.id, skipped.reason, skipped.detail)
            else:
                report.converted.update(item[0]["conversions"])
                writer.write(*item)
    writer.close()
    report.written, report.shards = writer.count, writer.shards
    (out_dir / "prepare_report.json").write_text(json.dumps(
        {"written": report.written, "shards": report.shards, "converted": dict(report.converted),
         "skipped_by_reason": dict(report.by_reason()), "skipped": [asdict(s) for s in report.skipped]},
        indent=1, sort_keys=True))
    if report.written == 0:
        raise ValueError(f"no valid records in {input_path}; see {out_dir / 'prepare_report.json'}")
    run_energon_prepare(out_dir, split_ratio)
    return report
