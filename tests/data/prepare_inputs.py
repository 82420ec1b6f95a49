"""Small `sail-data prepare` inputs made in code for the prepare tests."""

import io
import json
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from tests.data.test_image_io import encode, noise


def photo_jpeg(**save_kwargs) -> bytes:
    """A real photograph (scikit-image's astronaut) as JPEG bytes."""
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, "JPEG", **{"quality": 90, **save_kwargs})
    return buf.getvalue()


def truncated_with_eoi(jpeg: bytes, keep: float = 0.5) -> bytes:
    """The first `keep` of a JPEG, closed again with an EOI marker (what a cut download often is)."""
    return jpeg[: int(len(jpeg) * keep)] + b"\xff\xd9"


def llava(
    rid: str,
    images: Union[None, str, Sequence[str], object],
    text: str = "<image>\nWhat is this?",
    answer: str = "A picture.",
) -> dict:
    rec = {"id": rid, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]}
    if images is not None:
        rec["image"] = images
    return rec


def write_jsonl(path: Path, records: List[object], encoding: str = "utf-8", bom: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    return path


def image_folder(root: Path, names: Optional[Sequence[str]] = None) -> Path:
    """`root/images` with small valid JPEGs named `names` (default one, good.jpg)."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names or ["good.jpg"]):
        (folder / name).write_bytes(encode(noise(64, 48, seed=i), "JPEG", quality=90))
    return folder


def tree(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder` (to prove nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def big_bmp(path: Path, side: int = 512) -> Path:
    """An uncompressed side x side RGB BMP (512 -> about 0.8 MB), so each read costs real memory."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path, "BMP")
    return path
