"""The question as the model saw its training data: images tiled by the data config's rule, the
conversation rendered by the training chat template with every `<image>` expanded to tiles x
tokens_per_tile `<IMG_CONTEXT>` ids, then an open assistant turn; the micro-batch made by the trainer's
`BatchMaterializer` (expansion check, PIL tile decoding, normalization) as one unpacked row."""

import dataclasses
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import torch

from sail_megatron.chat.errors import ChatError
from sail_megatron.config.data import DataConfig
from sail_megatron.data.batch import Batch
from sail_megatron.data.chat_template import ChatTemplate
from sail_megatron.data.decode import BatchMaterializer, build_tile_decoder
from sail_megatron.data.image_io import ImageError, decode_rgb, read_image_size
from sail_megatron.data.sample import IMAGE_PLACEHOLDER, MalformedSample, VLSample
from sail_megatron.data.task_encoder import RawBatch
from sail_megatron.data.tiling import TilePlan, plan_tiles
from sail_megatron.data.tokenizer import Tokenizer

KEY = "sail-chat"


@dataclass
class ChatImage:
    path: Path
    data: bytes
    plan: TilePlan


def read_images(paths: Sequence[str], data: DataConfig, tile_size: int) -> List[ChatImage]:
    """Each file's bytes and tile plan, planned from its header as the loader does (no decode yet)."""
    images = []
    for name in paths:
        path = Path(name)
        raw = _read_image_file(path)
        try:
            width, height = read_image_size(raw, max_pixels=data.max_pixels)
        except ImageError as e:
            raise ChatError(f"--image {path} is not a usable image ({e})") from None
        plan = plan_tiles(width, height, data.min_tiles, data.max_tiles, tile_size, data.use_thumbnail)
        images.append(ChatImage(path, raw, plan))
    return images


def _read_image_file(path: Path) -> bytes:
    """The bytes of a regular file, or a ChatError saying what `path` is instead (a symlink loop, a
    dangling link, a folder, a FIFO or device that would block or never end, an unreadable file)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise ChatError(f"--image {path} is a symbolic link to {os.readlink(path)}, which does not exist") from None
        raise ChatError(f"--image {path}: no such file") from None
    except OSError as e:  # ELOOP: a symbolic link loop; EACCES on a folder on the way, ...
        what = "a symbolic link loop" if e.errno == errno.ELOOP else "not readable"
        raise ChatError(f"--image {path} is {what} ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ChatError(f"--image {path}: is a folder")
    if not stat.S_ISREG(mode):
        raise ChatError(f"--image {path} is not a regular file (a FIFO, socket or device): pass an image file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ChatError(f"--image {path} is not readable ({e.strerror or e})") from None


def user_text(prompt: str, num_images: int) -> str:
    """The user turn: the prompt as given when it places its own `<image>` markers, else one
    `<image>\\n` per image before it (InternVL's chat does the same)."""
    if IMAGE_PLACEHOLDER in prompt:
        return prompt
    return f"{IMAGE_PLACEHOLDER}\n" * num_images + prompt


def prompt_ids(template: ChatTemplate, prompt: str, images: List[ChatImage]) -> List[int]:
    """Token ids of the conversation [user: images + prompt] (with the template's system turn) and the
    open assistant turn."""
    turns = [("user", user_text(prompt, len(images)))]
    sample = VLSample(
        __key__=KEY, __restore_key__=(), kind="conversation", turns=turns, images=[i.data for i in images]
    )
    try:
        pieces = template.render_prompt(sample, [i.plan for i in images])
    except MalformedSample as e:
        raise ChatError(f"--prompt: {e}") from None
    return [t for p in pieces for t in p.ids]


def first_batch(
    ids: List[int],
    images: List[ChatImage],
    tokenizer: Tokenizer,
    tile_size: int,
    tokens_per_tile: int,
    data: DataConfig,
    device: torch.device,
) -> Batch:
    """The prompt as one unpacked row with its decoded tiles (the trainer's materializer; fp32 tiles, as
    training feeds them whatever the model's dtype)."""
    materialize = BatchMaterializer(
        build_tile_decoder("pil", device, max_pixels=data.max_pixels),
        tile_size,
        device,
        tokens_per_tile=tokens_per_tile,
        image_token_id=tokenizer.ids.img_context,
    )
    tokens = torch.tensor([ids], dtype=torch.long)
    raw = RawBatch(
        keys=[KEY],
        tokens=tokens,
        labels=torch.full_like(tokens, tokenizer.ids.pad),
        loss_mask=torch.zeros(tokens.shape),
        position_ids=torch.arange(len(ids))[None],
        images=[i.data for i in images],
        plans=[i.plan for i in images],
        image_sample=[0] * len(images),
        spans=[(0, 0, len(ids))],
    )
    batch = materialize(raw)
    if materialize.skipped.get("decode_failed"):
        for image in images:  # name the image at fault
            try:
                decode_rgb(image.data, data.max_pixels)
            except (ImageError, OSError, ValueError) as e:
                raise ChatError(f"--image {image.path} could not be decoded ({e})") from None
        raise ChatError("an image could not be decoded")
    return batch


def next_batch(batch: Batch, ids: List[int]) -> Batch:
    """The same row grown to `ids` (the prompt plus the answer so far), tiles reused."""
    tokens = torch.tensor([ids], dtype=torch.long, device=batch.tokens.device)
    return dataclasses.replace(
        batch,
        tokens=tokens,
        labels=torch.zeros_like(tokens),
        loss_mask=torch.zeros(tokens.shape, device=tokens.device),
        position_ids=torch.arange(len(ids), device=tokens.device)[None],
    )
