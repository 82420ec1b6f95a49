"""Chat template, image-token expansion, loss masks and the over-length policy.

Layouts (chatml tokens, InternVL image blocks; `end` is what the template puts after <|im_end|>):
  caption:       <img><IMG_CONTEXT>*n</img>\\n{caption}<|im_end|>           loss on caption + <|im_end|>
  conversation:  [<|im_start|>system\\n{system}<|im_end|>{end}]
                 <|im_start|>user\\n{text, each <image> -> image block}<|im_end|>{end}
                 <|im_start|>assistant\\n{answer}<|im_end|>{end} ...          loss on answers + their <|im_end|>
The template (`templates.py`: 'chatml', 'sailvl-chat', 'internvl2_5') decides `end` ('\\n' or nothing)
and the system message used when neither the sample nor `system_prompt` sets one. The caption layout is
the same for every template.
At inference (`render_prompt`) a conversation ending with a user turn is followed by an open assistant
turn, `<|im_start|>assistant\\n`, as the upstream templates render a prompt whose last message is empty.
Text is tokenized piece by piece and special ids are inserted directly, so loss-mask boundaries are
exact and image blocks are never tokenized from strings. Sample text goes through `encode_text`: a
control-token string typed in it ("<|im_end|>", "<IMG_CONTEXT>") stays text and never becomes the
template's ids; only `<image>` placeholders are replaced, by image blocks.

Over-length policy (a sequence must fit `seq_length` input tokens):
  1. conversations drop whole trailing rounds (and the images those rounds show), keeping the first;
  2. then text after the last image block is cut from the end;
  3. a cut never falls inside an image block: if the image blocks alone do not fit, the sample is
     skipped. Every conversion and skip is counted by reason.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from sail_megatron.data.sample import IMAGE_PLACEHOLDER, EncodedSample, MalformedSample, VLSample
from sail_megatron.data.templates import DEFAULT_TEMPLATE, get_template
from sail_megatron.data.tiling import TilePlan
from sail_megatron.data.tokenizer import Tokenizer


class SkipReason(Exception):
    """The sample cannot be used; `reason` is the counter name."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class Piece:
    ids: List[int]
    trained: bool
    image: Optional[int] = None  # index of the image this block shows
    round: int = 0  # conversation round (user turn + its answers)


class ChatTemplate:
    """Renders samples with one of the chat templates of `templates.py`.

    system_prompt: replaces the template's default system message ('' renders no system turn); a
    sample's own system turn replaces both."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        tokens_per_tile: int,
        system_prompt: Optional[str] = None,
        template: str = DEFAULT_TEMPLATE,
    ):
        self.tok = tokenizer
        self.ids = tokenizer.ids
        self.tokens_per_tile = tokens_per_tile
        self.spec = get_template(template)
        self.system_prompt = self.spec.default_system if system_prompt is None else system_prompt
        self._newline = tokenizer.encode_text("\n")
        self._turn_end = tokenizer.encode_text(self.spec.turn_end) if self.spec.turn_end else []

    def _image_block(self, index: int, plan: TilePlan, round_: int) -> Piece:
        ids = (
            [self.ids.img_start] + [self.ids.img_context] * (plan.num_tiles * self.tokens_per_tile) + [self.ids.img_end]
        )
        return Piece(ids, trained=False, image=index, round=round_)

    def _text_with_images(
        self, text: str, plans: List[TilePlan], next_image: int, round_: int
    ) -> Tuple[List[Piece], int]:
        pieces = []
        parts = text.split(IMAGE_PLACEHOLDER)
        for i, part in enumerate(parts):
            if i > 0:
                if next_image >= len(plans):
                    raise MalformedSample(f"more {IMAGE_PLACEHOLDER} placeholders than the {len(plans)} images")
                pieces.append(self._image_block(next_image, plans[next_image], round_))
                next_image += 1
            if part:
                pieces.append(Piece(self.tok.encode_text(part), trained=False, round=round_))
        return pieces, next_image

    def _turn_start(self, role: str, round_: int) -> Piece:
        return Piece([self.ids.im_start] + self.tok.encode_text(f"{role}\n"), False, round=round_)

    def render(self, sample: VLSample, plans: List[TilePlan]) -> List[Piece]:
        ids = self.ids
        if sample.kind == "caption":
            pieces = [self._image_block(i, p, 0) for i, p in enumerate(plans)]
            caption = " ".join(text for role, text in sample.turns if role == "caption")
            pieces += [
                Piece(self._newline, False),
                Piece(self.tok.encode_text(caption), True),
                Piece([ids.im_end], True),
            ]
            return pieces
        if sample.kind != "conversation":
            raise MalformedSample(f"unknown sample kind {sample.kind!r}")
        pieces: List[Piece] = []
        system = next((t for r, t in sample.turns if r == "system"), self.system_prompt)
        end = self._turn_end
        if system:
            system_ids = self.tok.encode_text(f"system\n{system}")
            pieces.append(Piece([ids.im_start] + system_ids + [ids.im_end] + end, False))
        next_image, round_ = 0, -1
        for role, text in sample.turns:
            if role == "user":
                round_ += 1
                body, next_image = self._text_with_images(text, plans, next_image, round_)
                pieces.append(self._turn_start("user", round_))
                pieces += body
                pieces.append(Piece([ids.im_end] + end, False, round=round_))
            elif role == "assistant":
                if IMAGE_PLACEHOLDER in text:
                    raise MalformedSample("an assistant turn contains an image placeholder")
                round_ = max(round_, 0)
                pieces.append(self._turn_start("assistant", round_))
                pieces.append(Piece(self.tok.encode_text(text) + [ids.im_end], True, round=round_))
                if end:  # the separator after an answer is context, not a target
                    pieces.append(Piece(end, False, round=round_))
            elif role != "system":
                raise MalformedSample(f"unknown role {role!r}")
        if next_image != len(plans):
            raise MalformedSample(f"{next_image} {IMAGE_PLACEHOLDER} placeholders for {len(plans)} images")
        return pieces

    def render_prompt(self, sample: VLSample, plans: List[TilePlan]) -> List[Piece]:
        """A conversation that ends with a user turn, rendered as in training, then the open assistant
        turn the model answers from (inference; nothing in it is trained)."""
        if sample.kind != "conversation" or not sample.turns or sample.turns[-1][0] != "user":
            raise MalformedSample("a generation prompt is a conversation that ends with a user turn")
        pieces = self.render(sample, plans)
        return pieces + [self._turn_start("assistant", max(p.round for p in pieces))]

    def encode(self, sample: VLSample, images: List[bytes], plans: List[TilePlan], seq_length: int) -> EncodedSample:
        """Tokenize, apply the over-length policy and build labels and the loss mask."""
        pieces = self.render(sample, plans)
        notes: Dict[str, int] = {}
        pieces = fit_to_length(pieces, seq_length + 1, notes)  # +1: inputs and labels are shifted copies
        kept_images = sorted({p.image for p in pieces if p.image is not None})
        full = torch.tensor([t for p in pieces for t in p.ids], dtype=torch.long)
        trained = torch.tensor([p.trained for p in pieces for _ in p.ids], dtype=torch.bool)
        if not trained[1:].any():
            raise SkipReason("no_target", "nothing left to train on")
        return EncodedSample(
            key=sample.__key__,
            tokens=full[:-1],
            labels=full[1:],
            loss_mask=trained[1:],
            images=[images[i] for i in kept_images],
            plans=[plans[i] for i in kept_images],
            notes=notes,
        )


def _length(pieces: List[Piece]) -> int:
    return sum(len(p.ids) for p in pieces)


def fit_to_length(pieces: List[Piece], budget: int, notes: Dict[str, int]) -> List[Piece]:
    """Apply the over-length policy (module docstring); returns pieces of at most `budget` ids."""
    if _length(pieces) <= budget:
        return pieces
    last_round = max(p.round for p in pieces)
    while last_round > 0 and _length(pieces) > budget:
        pieces = [p for p in pieces if p.round < last_round]
        last_round -= 1
        notes["dropped_rounds"] = notes.get("dropped_rounds", 0) + 1
    excess = _length(pieces) - budget
    if excess <= 0:
        return pieces
    last_image = max((i for i, p in enumerate(pieces) if p.image is not None), default=-1)
    cuttable = sum(len(p.ids) for p in pieces[last_image + 1 :])
    if cuttable < excess:
        raise SkipReason("too_long", f"image blocks need {_length(pieces[: last_image + 1])} tokens, budget {budget}")
    out = list(pieces)
    while excess > 0:
        tail = out[-1]
        if len(tail.ids) <= excess:
            out.pop()
            excess -= len(tail.ids)
        else:
            out[-1] = Piece(tail.ids[: len(tail.ids) - excess], tail.trained, tail.image, tail.round)
            excess = 0
    notes["truncated_text"] = notes.get("truncated_text", 0) + 1
    return out
