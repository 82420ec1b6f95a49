"""Greedy decoding through the training forward, without a KV cache.

Each new token re-runs the model on the whole row (prompt + answer so far): `SailVLModel.forward`, the
training forward, with logits instead of losses. The vision encoder and projector run once per answer:
their output for the row's tiles is handed back to every later forward (`vision_computed_once`).

The next token is the argmax over the tokenizer's ids (megatron's vocabulary padding and ids the
tokenizer cannot decode are never chosen) except `<IMG_CONTEXT>`: the forward would take a generated one
for an image slot. Decoding stops at `<|im_end|>`, at the tokenizer's eos, or after max_new_tokens.
"""

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, List

import torch

from sail_megatron.chat.prompt import next_batch
from sail_megatron.data.batch import Batch
from sail_megatron.data.tokenizer import Tokenizer
from sail_megatron.training.step import packed_seq_params

if TYPE_CHECKING:
    from sail_megatron.model.sail_vl import SailVLModel

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    ids: List[int]
    """Generated ids, the stop token left out."""
    stopped_by: str
    """'im_end', 'eos' or 'max_new_tokens'."""
    seconds: float


@contextmanager
def vision_computed_once(model: "SailVLModel", pixel_values) -> Iterator[None]:
    """Inside the block, the model's forward takes the vision tokens of `pixel_values` (this very tensor)
    from one run of its vision encoder and projector, computed here."""
    if pixel_values is None or pixel_values.shape[0] == 0:
        yield
        return
    with torch.no_grad():
        vision = model.encode_images(pixel_values)
    encode = model.encode_images

    def encode_once(pixels: torch.Tensor) -> torch.Tensor:
        return vision if pixels is pixel_values else encode(pixels)

    model.encode_images = encode_once  # an instance attribute: the forward's self.encode_images
    try:
        yield
    finally:
        del model.encode_images


def last_logits(model: "SailVLModel", batch: Batch) -> torch.Tensor:
    """[padded vocab] fp32 logits at the row's last position, from the training forward."""
    with torch.no_grad():
        logits = model(
            batch.tokens,
            batch.position_ids,
            None,
            pixel_values=batch.pixel_values,
            labels=None,
            packed_seq_params=packed_seq_params(batch),
        )
    return logits[0, -1].float()


def choose(logits: torch.Tensor, tokenizer: Tokenizer, vocab_size: int) -> int:
    """The greedy choice among the ids the model may produce (module docstring)."""
    usable = logits[: min(vocab_size, tokenizer.vocab_size)].clone()
    usable[tokenizer.ids.img_context] = float("-inf")
    return int(usable.argmax())


def greedy(model: "SailVLModel", batch: Batch, tokenizer: Tokenizer, vocab_size: int, max_new_tokens: int) -> Answer:
    """Answer the prompt row `batch` greedily (module docstring)."""
    began = time.perf_counter()
    ids: List[int] = batch.tokens[0].tolist()
    prompt_length = len(ids)
    stops = {tokenizer.ids.eos: "eos", tokenizer.ids.im_end: "im_end"}  # im_end names it when both are one id
    stopped_by = "max_new_tokens"
    step = batch
    with vision_computed_once(model, batch.pixel_values):
        for _ in range(max_new_tokens):
            token = choose(last_logits(model, step), tokenizer, vocab_size)
            if token in stops:
                stopped_by = stops[token]
                break
            ids.append(token)
            step = next_batch(batch, ids)
    return Answer(ids[prompt_length:], stopped_by, time.perf_counter() - began)


def describe(answer: Answer, prompt_length: int) -> str:
    per_token = answer.seconds / max(len(answer.ids) + (answer.stopped_by != "max_new_tokens"), 1)
    return (
        f"{len(answer.ids)} tokens after a {prompt_length}-token prompt in {answer.seconds:.2f} s "
        f"({per_token:.3f} s per forward), stopped by {answer.stopped_by}"
    )
