"""One question, end to end: `prepare` checks every input and builds the prompt without touching a model
(megatron-core is not even imported, so bad input is told at once); `answer` loads the model and decodes
greedily."""

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence

import torch

from sail_megatron.chat.errors import ChatError
from sail_megatron.chat.prompt import ChatImage, first_batch, prompt_ids, read_images
from sail_megatron.chat.source import ChatSource, resolve_source
from sail_megatron.data.chat_template import ChatTemplate
from sail_megatron.data.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from sail_megatron.chat.generate import Answer

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    source: ChatSource
    tokenizer: Tokenizer
    images: List[ChatImage]
    ids: List[int]
    """The prompt's token ids, ending with the open assistant turn."""


def _tokenizer(source: ChatSource) -> Tokenizer:
    path = source.data.tokenizer
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:  # transformers raises many types for an unusable folder
        raise ChatError(f"cannot load a tokenizer from {path}: {str(e).strip().splitlines()[0]}") from None
    if tokenizer.vocab_size > source.model.language.vocab_size:
        raise ChatError(
            f"the tokenizer {path} has {tokenizer.vocab_size} tokens, the model embeds "
            f"{source.model.language.vocab_size}: pass --tokenizer with the one it was trained with"
        )
    return tokenizer


def prepare(
    ckpt,
    images: Sequence[str],
    prompt: str,
    tokenizer: Optional[str] = None,
    template: Optional[str] = None,
    system: Optional[str] = None,
    max_tiles: Optional[int] = None,
) -> Prepared:
    """Every input checked and the prompt rendered as training renders it. Raises ChatError (or the
    converter's and checkpoint checks' errors) for unusable input."""
    source = resolve_source(ckpt, tokenizer=tokenizer, template=template, system=system, max_tiles=max_tiles)
    chat_images = read_images(images, source.data, source.model.vision.image_size)
    tok = _tokenizer(source)
    renderer = ChatTemplate(tok, source.model.tokens_per_tile, source.data.system_prompt, source.data.template)
    ids = prompt_ids(renderer, prompt, chat_images)
    tiles = sum(i.plan.num_tiles for i in chat_images)
    logger.info(
        "prompt: %d tokens, %d image(s) in %d tile(s) of %d tokens (template %s)",
        len(ids),
        len(chat_images),
        tiles,
        source.model.tokens_per_tile,
        source.data.template,
    )
    return Prepared(source, tok, chat_images, ids)


def answer(prepared: Prepared, max_new_tokens: int, device: torch.device, dtype: str) -> "Answer":
    """Load the model and answer greedily."""
    from sail_megatron.chat.generate import describe, greedy
    from sail_megatron.chat.loading import load_chat_model, one_process

    src, tok = prepared.source, prepared.tokenizer
    longest = len(prepared.ids) + max_new_tokens
    if src.trained_seq_length is not None and longest > src.trained_seq_length:
        logger.warning(
            "prompt and answer may reach %d tokens; the run trained on at most %d (data.seq_length)",
            longest,
            src.trained_seq_length,
        )
    with one_process(device):
        model = load_chat_model(src, tok.ids.img_context, device, dtype)
        batch = first_batch(
            prepared.ids,
            prepared.images,
            tok,
            src.model.vision.image_size,
            src.model.tokens_per_tile,
            src.data,
            device,
        )
        reply = greedy(model, batch, tok, src.model.language.vocab_size, max_new_tokens)
    logger.info("answer: %s", describe(reply, len(prepared.ids)))
    return reply
