"""Small WebDataset shards in img2dataset's layout (`KEY.jpg` + `KEY.txt` / `KEY.json`), made in code from
scikit-image's photographs, with the bad records real crawls hold."""

import io
import json
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from PIL import Image

from tests.data.prepare_inputs import truncated_with_eoi

_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@lru_cache(maxsize=None)
def photo(index: int = 0, fmt: str = "JPEG", size=(96, 64)) -> bytes:
    """One of scikit-image's photographs, small, encoded as `fmt`."""
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, _PHOTOS[index % len(_PHOTOS)])()).convert("RGB").resize(size)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def good(i: int, caption: Optional[str] = None) -> Dict[str, bytes]:
    """A usable record: a photo and its caption in .txt and in .json (as img2dataset writes both)."""
    text = caption or f"a photograph number {i}"
    meta = {"caption": text, "url": f"https://example.invalid/{i}.jpg", "status": "success"}
    return {"jpg": photo(i), "txt": text.encode(), "json": json.dumps(meta).encode()}


# name -> (parts, the reason training skips it, or None when it is usable)
def bad_records() -> Dict[str, tuple]:
    jpeg = photo(0)
    return {
        "png": ({"png": photo(1, "PNG"), "txt": b"a cat in png"}, None),
        "webp": ({"webp": photo(2, "WEBP"), "txt": b"a coffee cup in webp"}, None),
        "no_image": ({"txt": b"the download failed", "json": b'{"status": "failed_to_download"}'}, "no_image"),
        "no_caption": ({"jpg": jpeg, "json": b"{}"}, "no_caption"),
        "empty_caption": ({"jpg": jpeg, "txt": b"  \n "}, "empty_caption"),
        "truncated": ({"jpg": truncated_with_eoi(jpeg, 0.3)[:-2], "txt": b"cut short"}, "image_truncated"),
        "not_an_image": ({"jpg": b"<html>404 not found</html>", "txt": b"an error page"}, "image_not_an_image"),
        "two_images": ({"jpg": jpeg, "png": photo(1, "PNG"), "txt": b"which one"}, "several_images"),
    }


def write_shards(folder: Path, shards: Sequence[List[Dict[str, bytes]]], prefix: str = "") -> Path:
    """`folder/{prefix}00000.tar`, ...: shard s holds its records under keys s * 10000 + i (dot-free, as
    img2dataset names them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, records in enumerate(shards):
        with tarfile.open(folder / f"{prefix}{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, parts in enumerate(records):
                key = f"{s:05d}{i:04d}"
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    return folder


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` (hidden ones too) with its kind, mode, mtime and bytes: equal before and after
    means nothing was written, renamed or touched."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (st.st_mode, st.st_mtime_ns, p.read_bytes() if p.is_file() else None)
    st = folder.lstat()
    out["."] = (st.st_mode, st.st_mtime_ns, None)
    return out
