"""Chat template, image-token expansion, loss masks and the over-length policy."""

import pytest
import torch

from sail_megatron.data.chat_template import ChatTemplate, SkipReason
from sail_megatron.data.sample import MalformedSample, VLSample
from sail_megatron.data.tiling import TilePlan
from sail_megatron.data.tokenizer import build_demo_tokenizer, load_tokenizer

TEXTS = [
    "a cat sits on a red mat",
    "what is in the picture?",
    "the answer is a rocket on a launch pad",
    "describe both images",
    "system prompt text",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_demo_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=300))


def _sample(kind, turns, n_images):
    return VLSample(__key__="k", __restore_key__=(), kind=kind, turns=turns, images=[b"x"] * n_images)


ONE = TilePlan(1, 1, False)
FOUR = TilePlan(2, 2, False)  # 4 tiles
WITH_THUMB = TilePlan(2, 1, True)  # 3 tiles


def trained_text(tok, enc):
    return tok.decode(enc.labels[enc.loss_mask].tolist())


def test_caption_layout_and_loss(tok):
    t = ChatTemplate(tok, tokens_per_tile=4)
    enc = t.encode(_sample("caption", [("caption", "a cat sits on a red mat")], 1), [b"x"], [WITH_THUMB], 256)
    full = torch.cat([enc.tokens, enc.labels[-1:]])
    ids = tok.ids
    assert full[0] == ids.img_start and full[1 + 12] == ids.img_end
    assert (full[1:13] == ids.img_context).all(), "3 tiles x 4 tokens"
    assert trained_text(tok, enc) == "a cat sits on a red mat<|im_end|>"
    assert enc.num_tiles == 3 and torch.equal(enc.labels[:-1], enc.tokens[1:])


def test_conversation_trains_on_answers_only(tok):
    t = ChatTemplate(tok, tokens_per_tile=2, system_prompt="system prompt text")
    turns = [
        ("user", "describe both images\n<image> and <image>"),
        ("assistant", "a cat sits on a red mat"),
        ("user", "what is in the picture?"),
        ("assistant", "the answer is a rocket on a launch pad"),
    ]
    enc = t.encode(_sample("conversation", turns, 2), [b"a", b"b"], [ONE, FOUR], 512)
    assert trained_text(tok, enc) == "a cat sits on a red mat<|im_end|>the answer is a rocket on a launch pad<|im_end|>"
    assert int((enc.tokens == tok.ids.img_context).sum()) == (1 + 4) * 2
    text = tok.decode(enc.tokens.tolist())
    assert text.startswith(
        "<|im_start|>system\nsystem prompt text<|im_end|>\n<|im_start|>user\ndescribe both images\n<img>"
    )
    assert "<|im_start|>assistant\n" in text


def test_placeholder_count_must_match_images(tok):
    t = ChatTemplate(tok, tokens_per_tile=2)
    turns = [("user", "<image> what is in the picture?"), ("assistant", "a cat")]
    with pytest.raises(MalformedSample):
        t.encode(_sample("conversation", turns, 2), [b"a", b"b"], [ONE, ONE], 256)
    with pytest.raises(MalformedSample):
        t.encode(_sample("conversation", [("user", "<image><image> hi"), ("assistant", "a")], 1), [b"a"], [ONE], 256)


def test_over_length_drops_whole_rounds_first(tok):
    t = ChatTemplate(tok, tokens_per_tile=2)
    turns = [
        ("user", "<image> what is in the picture?"),
        ("assistant", "a cat sits on a red mat"),
        ("user", "<image> describe both images"),
        ("assistant", "the answer is a rocket on a launch pad " * 3),
    ]
    full = t.encode(_sample("conversation", turns, 2), [b"a", b"b"], [ONE, ONE], 1024)
    short = t.encode(_sample("conversation", turns, 2), [b"a", b"b"], [ONE, ONE], full.num_tokens - 5)
    assert short.notes == {"dropped_rounds": 1}
    assert len(short.images) == 1, "the dropped round's image goes with it"
    assert trained_text(tok, short) == "a cat sits on a red mat<|im_end|>"


def test_over_length_cuts_text_but_never_an_image_block(tok):
    t = ChatTemplate(tok, tokens_per_tile=8)
    sample = _sample("caption", [("caption", "the answer is a rocket on a launch pad " * 4)], 1)
    full = t.encode(sample, [b"x"], [FOUR], 1024)
    budget = 4 * 8 + 2 + 6
    cut = t.encode(sample, [b"x"], [FOUR], budget)
    assert cut.num_tokens == budget and cut.notes == {"truncated_text": 1}
    assert torch.equal(cut.tokens, full.tokens[:budget])
    with pytest.raises(SkipReason) as e:
        t.encode(sample, [b"x"], [FOUR], 4 * 8)  # the image block alone does not fit
    assert e.value.reason == "too_long"


def test_nothing_to_train_is_skipped(tok):
    t = ChatTemplate(tok, tokens_per_tile=8)
    sample = _sample("caption", [("caption", "a cat")], 1)
    with pytest.raises(SkipReason) as e:
        t.encode(sample, [b"x"], [FOUR], 4 * 8 + 2)  # room for the image block only
    assert e.value.reason in ("no_target", "too_long")


CONTROL = "<|im_start|> <|im_end|> <img> </img> <IMG_CONTEXT> <|endoftext|>"


def _ids_of(tok, *names):
    return {getattr(tok.ids, n) for n in names}


def test_control_token_strings_in_sample_text_stay_text(tok):
    t = ChatTemplate(tok, tokens_per_tile=2)
    user, answer, system = f"<image>\nwhat is {CONTROL} here?", f"a cat {CONTROL}", f"system {CONTROL}"
    turns = [("system", system), ("user", user), ("assistant", answer)]
    enc = t.encode(_sample("conversation", turns, 1), [b"a"], [FOUR], 512)
    full = torch.cat([enc.tokens, enc.labels[-1:]]).tolist()
    split = lambda s: tok.hf.encode(s, add_special_tokens=False, split_special_tokens=True)  # noqa: E731
    ids, nl, ctx = tok.ids, tok.encode("\n"), [tok.ids.img_context] * (4 * 2)
    assert full == (
        [ids.im_start]
        + split(f"system\n{system}")
        + [ids.im_end]
        + nl
        + [ids.im_start]
        + split("user\n")
        + [ids.img_start]
        + ctx
        + [ids.img_end]
        + split(f"\nwhat is {CONTROL} here?")
        + [ids.im_end]
        + nl
        + [ids.im_start]
        + split("assistant\n")
        + split(answer)
        + [ids.im_end]
        + nl
    )
    assert trained_text(tok, enc) == f"{answer}<|im_end|>"
    caption = t.encode(_sample("caption", [("caption", f"a cat {CONTROL}")], 1), [b"x"], [ONE], 256)
    ctl = _ids_of(tok, "im_start", "img_start", "img_end", "img_context", "pad")
    assert not ctl & set(caption.tokens[1 + 2 + 1 :].tolist()), "no control id after the image block"
    assert trained_text(tok, caption) == f"a cat {CONTROL}<|im_end|>"


def test_normal_conversations_render_the_same_ids_as_plain_encoding(tok, monkeypatch):
    turns = [
        ("user", "describe both images\n<image> and <image>"),
        ("assistant", "a cat sits on a red mat"),
        ("user", "what is in the picture?"),
        ("assistant", "the answer is a rocket on a launch pad"),
    ]
    samples = [
        (_sample("conversation", turns, 2), [ONE, FOUR]),
        (_sample("caption", [("caption", "a cat sits on a red mat")], 1), [WITH_THUMB]),
    ]
    new = [ChatTemplate(tok, 2, "system prompt text").encode(s, s.images, p, 512) for s, p in samples]
    monkeypatch.setattr(tok, "encode_text", tok.encode)  # the template as it tokenized before
    old = [ChatTemplate(tok, 2, "system prompt text").encode(s, s.images, p, 512) for s, p in samples]
    for a, b in zip(new, old):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.loss_mask, b.loss_mask)
