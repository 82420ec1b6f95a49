"""WebDataset shards in img2dataset's layout, read where they lie: one sample per key, `KEY.jpg` (or `.jpeg`,
`.png`, `.webp`, ...) with its caption in `KEY.txt` or under a key of `KEY.json`.

`sail-data index` (`index.py`) writes energon's metadata for such shards and records the layout in the
dataset's `.nv-meta/dataset.yaml` as subflavors of a `CrudeWebdataset`:

    __module__: megatron.energon
    __class__: CrudeWebdataset
    subflavors: {sail_layout: img2dataset, sail_caption: txt}     # or json:caption
    part_filter: [jpg, jpeg, ..., JPG, JPEG, ..., txt]            # only these parts are read

energon hands every sample of that dataset to the first cooker of the task encoder whose `has_subflavors`
match (`task_encoder.py`): `cook_img2dataset_sample` for `sail_layout: img2dataset`, and `cook_vl_sample` for
everything else (the folders `sail-data prepare` writes, which carry no subflavors). A blend may mix both:
subflavors travel with each dataset.

The cooker gives the same `VLSample` as `cook_vl_sample` gives for a prepared caption record (kind
"caption", one caption turn, one image), and never raises: an entry it cannot use becomes a malformed
sample with one of the reasons below, which the task encoder skips, logs and counts like every other skip.
"""

import json
from typing import Dict, List, Tuple

from megatron.energon import basic_sample_keys, stateless

from sail_megatron.data.sample import VLSample, malformed_sample

LAYOUT = "img2dataset"
LAYOUT_KEY = "sail_layout"
CAPTION_KEY = "sail_caption"
IMAGE_PARTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
"""The parts read as the sample's image (the formats `image_io` decodes)."""
DEFAULT_CAPTION = "txt"

# Skip reasons of entries the cooker cannot use (counted by the loader, reported by `sail-data index`).
NO_IMAGE = "no_image"
SEVERAL_IMAGES = "several_images"
NO_CAPTION = "no_caption"
EMPTY_CAPTION = "empty_caption"
BAD_CAPTION = "bad_caption"  # not UTF-8, or a .json part that is not a JSON object


def parse_caption(spec: str) -> Tuple[str, str]:
    """`txt` -> ("txt", ""); `json:KEY` -> ("json", KEY). ValueError for anything else."""
    if spec == "txt":
        return "txt", ""
    kind, _, key = spec.partition(":")
    if kind == "json" and key:
        return "json", key
    raise ValueError(f"--caption {spec!r}: give txt (the KEY.txt part) or json:KEY (a key of the KEY.json part)")


def caption_part(spec: str) -> str:
    """The shard part that holds the caption under `spec`."""
    return parse_caption(spec)[0]


def dataset_yaml(caption: str) -> dict:
    """energon's dataset.yaml for shards of this layout with captions as `caption` says."""
    parse_caption(caption)
    return {
        "__module__": "megatron.energon",
        "__class__": "CrudeWebdataset",
        "subflavors": {LAYOUT_KEY: LAYOUT, CAPTION_KEY: caption},
        "part_filter": [*IMAGE_PARTS, *(p.upper() for p in IMAGE_PARTS), caption_part(caption)],
    }


def image_parts(raw: Dict[str, object]) -> List[str]:
    """The image parts of a raw entry (energon's part names: what follows the key's first dot)."""
    return [k for k in raw if k.lower() in IMAGE_PARTS]


def _caption(raw: dict, spec: str) -> Tuple[str, str]:
    """(caption text, "") or ("", reason) for the entry `raw`."""
    kind, key = parse_caption(spec)
    data = raw.get(kind)
    if data is None:
        return "", NO_CAPTION
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        if kind == "json":
            doc = json.loads(text)
            if not isinstance(doc, dict):
                return "", BAD_CAPTION
            text = doc.get(key)
            if text is None:
                return "", NO_CAPTION
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return "", BAD_CAPTION
    if not isinstance(text, str):
        return "", BAD_CAPTION
    return text.strip(), "" if text.strip() else EMPTY_CAPTION


_DETAILS = {
    NO_CAPTION: "no caption: the entry has no {where}",
    EMPTY_CAPTION: "the caption in {where} is empty",
    BAD_CAPTION: "the caption in {where} is not readable text",
}


def _where(spec: str) -> str:
    kind, key = parse_caption(spec)
    return ".txt part" if kind == "txt" else f"{key!r} in its .json part"


@stateless
def cook_img2dataset_sample(raw: dict) -> VLSample:
    """img2dataset entry {jpg (or another image part), txt and/or json} -> VLSample of kind caption."""
    spec = (raw.get("__subflavors__") or {}).get(CAPTION_KEY, DEFAULT_CAPTION)
    images = image_parts(raw)
    if not images:
        present = ", ".join(sorted(k for k in raw if not k.startswith("__"))) or "none"
        return malformed_sample(raw, NO_IMAGE, f"no image part ({', '.join(IMAGE_PARTS)}); parts: {present}")
    if len(images) > 1:
        return malformed_sample(raw, SEVERAL_IMAGES, f"several image parts: {', '.join(sorted(images))}")
    try:
        text, reason = _caption(raw, spec)
    except ValueError as e:  # a caption spec no `sail-data index` wrote
        return malformed_sample(raw, BAD_CAPTION, str(e))
    if reason:
        return malformed_sample(raw, reason, _DETAILS[reason].format(where=_where(spec)))
    data = raw[images[0]]
    image = data if isinstance(data, bytes) else bytes(data)
    return VLSample(**basic_sample_keys(raw), kind="caption", turns=[("caption", text)], images=[image])
