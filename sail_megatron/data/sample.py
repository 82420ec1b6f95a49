"""Typed samples between the shards and the model.

A sample is tokenized in loader workers without decoding pixels: it knows its token and tile
counts from the image headers. Pixels are decoded per micro-batch by a tile decoder (DALI on the GPU).
"""

import json
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from megatron.energon import Sample, basic_sample_keys, edataclass, stateless

from sail_megatron.data.tiling import TilePlan

IMAGE_PLACEHOLDER = "<image>"


class MalformedSample(ValueError):
    """A shard entry that does not follow the layout `sail-data prepare` writes."""


@edataclass
class VLSample(Sample):
    """A cooked shard entry: text turns plus the raw bytes of its images."""

    kind: str  # "caption", "conversation", or "malformed" (turns then hold one (reason, detail))
    turns: List[Tuple[str, str]]  # (role, text); roles: caption | user | assistant | system
    images: List[bytes]  # encoded bytes, in placeholder order


MALFORMED = "malformed"
"""The skip reason of an entry that does not follow its layout, when its cooker names no finer one."""


def malformed_sample(raw: dict, reason: str, detail: str) -> VLSample:
    """The VLSample standing for an entry that cannot be used: the task encoder skips it and counts `reason`."""
    return VLSample(**basic_sample_keys(raw), kind="malformed", turns=[(reason, detail)], images=[])


@stateless
def cook_vl_sample(raw: dict) -> VLSample:
    """CrudeWebdataset entry {json, img0.jpg, img1.png, ...} -> VLSample (no decoding).

    A malformed entry becomes kind "malformed" so the task encoder counts and logs it like every
    other skip, instead of tripping energon's consecutive-failure limit."""
    try:
        meta = json.loads(raw["json"])
        n_images = int(meta.get("num_images", 0))
        image_keys = sorted((k for k in raw if k.startswith("img")), key=lambda k: int(k[3:].split(".")[0]))
        if len(image_keys) != n_images:
            raise MalformedSample(f"json says {n_images} images, the shard holds {len(image_keys)}")
        turns = [(t["role"], t["text"]) for t in meta["turns"]]
        kind = meta["kind"]
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        return malformed_sample(raw, MALFORMED, f"{type(e).__name__}: {e}")
    return VLSample(**basic_sample_keys(raw), kind=kind, turns=turns, images=[raw[k] for k in image_keys])


@dataclass
class EncodedSample:
    """A tokenized sample with its images still encoded. Lengths are exact before any decode."""

    key: str
    tokens: torch.Tensor  # [L] int64 input ids, image blocks expanded
    labels: torch.Tensor  # [L] int64 next-token targets (tokens shifted by one)
    loss_mask: torch.Tensor  # [L] bool: True where labels[i] is trained on
    images: List[bytes]
    plans: List[TilePlan]
    notes: Dict[str, int] = field(default_factory=dict)  # counted conversions, e.g. {"truncated": 1}

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_tiles(self) -> int:
        return sum(p.num_tiles for p in self.plans)
