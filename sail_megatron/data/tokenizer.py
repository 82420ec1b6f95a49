"""Tokenizers for SAIL-VL / InternVL-style training.

`Tokenizer` wraps any local Hugging Face tokenizer folder (the real Qwen2.5 one on clusters, or the
small demo one built here) and looks up the chat and image special tokens by string, so no token id
is ever hard-coded. `build_demo_tokenizer` trains a tiny Qwen-like byte-level BPE for offline demos.

Data text (captions, user, assistant and system turns) is encoded with `encode_text`: the control
tokens the chat template places itself (chat markers, image markers, pad/eos) are tokenized there as the
plain text they spell, so a literal "<|im_end|>" or "<IMG_CONTEXT>" in a sample cannot forge a turn or an
image slot. Other added tokens (InternVL's grounding <ref>, <box>, <quad>, Qwen's <tool_call>) are data
vocabulary and stay single ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AbstractSet, Iterable, Optional, Sequence

if TYPE_CHECKING:
    from tokenizers import Tokenizer as RawTokenizer

# ChatML tokens (Qwen2.5 spelling).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Image tokens (InternVL / SAIL-VL spelling): <img> <IMG_CONTEXT>*n </img> marks one image.
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"

CHAT_TOKENS = (ENDOFTEXT, IM_START, IM_END)
IMAGE_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT)
# Order fixes the demo tokenizer's ids: pad=<|endoftext|> gets id 0.
SPECIAL_TOKENS = CHAT_TOKENS + IMAGE_TOKENS

# Qwen2's pre-tokenizer split pattern, so the demo tokenizer segments text the way Qwen2.5 does.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_demo_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4096, *, model_max_length: int = 8192
) -> Path:
    """Train a byte-level BPE on `texts` and save a Hugging Face tokenizer folder in `out_dir`.

    Deterministic: the same texts give a byte-identical tokenizer.json. `vocab_size` is an upper
    bound (a small corpus runs out of merges first) and counts the special tokens, which take ids
    0..5 and are never split or merged.
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RawTokenizer

    tok = RawTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        show_progress=False,
        # All 256 byte symbols up front: any text encodes, and char ids do not depend on the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    def corpus() -> Iterable[str]:
        # Special-token strings must not feed merges of their pieces; a newline in their place keeps
        # the neighbouring words ("<|im_start|>user") segmented as they are at encode time.
        for text in texts:
            for t in SPECIAL_TOKENS:
                text = text.replace(t, "\n")
            yield text

    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(specials)  # reuses ids 0..5; marks them atomic for encoding

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    # Written by hand rather than save_pretrained: stable bytes, and a tokenizer_class that both
    # transformers 4.x and 5.x resolve.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


@dataclass(frozen=True)
class TokenIds:
    pad: int
    eos: int
    im_start: int
    im_end: int
    img_start: int
    img_end: int
    img_context: int


def _text_tokenizer(hf, control: AbstractSet[str]) -> Optional["RawTokenizer"]:
    """A copy of a fast tokenizer's backend in which exactly the `control` tokens are special.

    With `encode_special_tokens` on, such a copy tokenizes the control strings as ordinary text while
    every other added token still matches whole. None when the tokenizer has no Rust backend."""
    raw = getattr(hf, "backend_tokenizer", None)
    if raw is None:
        return None
    spec = json.loads(raw.to_str())
    for added in spec.get("added_tokens", []):
        added["special"] = added["content"] in control
    return type(raw).from_str(json.dumps(spec))


class Tokenizer:
    """A local Hugging Face tokenizer folder plus the special-token ids the data pipeline needs."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.hf = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        # Base Qwen2.5 has eos=<|endoftext|>, Instruct and ours <|im_end|>: follow the folder's config.
        pad = self.hf.pad_token or ENDOFTEXT
        eos = self.hf.eos_token or IM_END
        self.ids = TokenIds(
            pad=self._special_id(pad),
            eos=self._special_id(eos),
            im_start=self._special_id(IM_START),
            im_end=self._special_id(IM_END),
            img_start=self._special_id(IMG_START),
            img_end=self._special_id(IMG_END),
            img_context=self._special_id(IMG_CONTEXT),
        )
        roles = (self.hf.bos_token, self.hf.eos_token, self.hf.pad_token, self.hf.unk_token)
        self.control_tokens = frozenset(SPECIAL_TOKENS) | {t for t in roles if t}
        self._text = _text_tokenizer(self.hf, self.control_tokens)

    def _special_id(self, token: str) -> int:
        fix = (
            "add <IMG_CONTEXT>, <img>, </img> as special tokens, as InternVL/SAIL-VL tokenizers do"
            if token in IMAGE_TOKENS
            else f"add {token} as a special token"
        )
        if token not in self.hf.get_vocab():
            raise ValueError(f"tokenizer at {self.path} has no {token!r} token; {fix}")
        tid = self.hf.convert_tokens_to_ids(token)
        # In the vocab but not an added token would still be split when it appears in text.
        if self.encode(token) != [tid]:
            raise ValueError(f"tokenizer at {self.path} splits {token!r} into {self.encode(token)}; {fix}")
        return tid

    def encode(self, text: str) -> list[int]:
        """Token ids of trusted markup; no BOS/EOS added, special-token strings map to their single ids."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of data text: control-token strings in it are tokenized as the text they spell."""
        if self._text is None:  # no Rust backend: the slower path splits every special token
            return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=True))
        self._text.encode_special_tokens = True  # set per call: pickling to loader workers drops the flag
        return self._text.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (the embedding table needs at least this many rows)."""
        return len(self.hf)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer(path)
