import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub

import pytest

from sail_megatron.data.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    SPECIAL_TOKENS,
    TokenIds,
    build_demo_tokenizer,
    load_tokenizer,
)

TEXTS = [
    "A tabby cat with green eyes looks past the camera.",
    "A white rocket stands on the launch pad at dusk, lit from below.",
    "Image-1: <image>\nImage-2: <image>\nWhich image is in colour?",
    "The first one. The second is black and white. Café, naïve, 日本語, 123 + 456 = 579.",
] * 4


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_demo_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=512)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_special_tokens_are_single_ids_and_round_trip(tok):
    ids = [tok.encode(t) for t in SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(SPECIAL_TOKENS)
    for t in SPECIAL_TOKENS:
        assert tok.decode(tok.encode(t)) == t
    assert tok.ids == TokenIds(
        pad=tok.hf.convert_tokens_to_ids(ENDOFTEXT),
        eos=tok.hf.convert_tokens_to_ids(IM_END),
        im_start=tok.encode("<|im_start|>")[0],
        im_end=tok.encode(IM_END)[0],
        img_start=tok.encode(IMG_START)[0],
        img_end=tok.encode(IMG_END)[0],
        img_context=tok.encode(IMG_CONTEXT)[0],
    )


def test_chat_text_round_trips_and_specials_are_not_merged(tok):
    text = (
        f"<|im_start|>user\n{IMG_START}{IMG_CONTEXT * 3}{IMG_END}\nWhat is this? Café 日本<|im_end|>\n"
        f"<|im_start|>assistant\nA cat.<|im_end|>{ENDOFTEXT}"
    )
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.count(tok.ids.img_context) == 3 and ids.count(tok.ids.im_start) == 2
    assert ids[0] == tok.ids.im_start  # no BOS added
    assert ids[-1] == tok.ids.pad  # no EOS added after the text


def test_image_context_run_encodes_to_one_id_each(tok):
    assert tok.encode(IMG_CONTEXT * 256) == [tok.ids.img_context] * 256
    ids = tok.encode(f"x{IMG_START}{IMG_CONTEXT * 256}{IMG_END}y")
    assert ids.count(tok.ids.img_context) == 256
    assert ids.index(tok.ids.img_start) + 257 == ids.index(tok.ids.img_end)


def test_build_is_deterministic(tmp_path, tok_dir):
    again = build_demo_tokenizer(TEXTS, tmp_path / "a", vocab_size=512)
    # A fresh process too: Rust hash maps are seeded per process.
    script = (
        "import sys; from sail_megatron.data.tokenizer import build_demo_tokenizer; "
        f"build_demo_tokenizer({TEXTS!r}, sys.argv[1], vocab_size=512)"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "b")], check=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        ref = (tok_dir / name).read_bytes()
        assert (again / name).read_bytes() == ref
        assert (tmp_path / "b" / name).read_bytes() == ref


def test_vocab_size_bound(tok):
    assert len(SPECIAL_TOKENS) < tok.vocab_size <= 512
    assert tok.ids.pad == 0  # special tokens take the first ids


def test_loads_with_transformers_offline(tok_dir, tok):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    auto = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    assert auto.eos_token == IM_END and auto.pad_token == ENDOFTEXT
    assert auto.model_max_length == 8192
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    text = f"<|im_start|>user\n{IMG_START}{IMG_CONTEXT}{IMG_END} A rocket at dusk.<|im_end|>"
    expected = tok.encode(text)
    assert auto.encode(text, add_special_tokens=False) == expected
    assert fast.encode(text, add_special_tokens=False) == expected
    assert len(fast) == len(auto) == tok.vocab_size


def _copy_without(tok_dir: Path, dst: Path, token: str, keep_in_vocab: bool) -> Path:
    dst.mkdir()
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != token]
    if not keep_in_vocab:
        del spec["model"]["vocab"][token]
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    (dst / "tokenizer_config.json").write_bytes((tok_dir / "tokenizer_config.json").read_bytes())
    return dst


def test_missing_image_token_gives_clear_error(tok_dir, tmp_path):
    folder = _copy_without(tok_dir, tmp_path / "no_ctx", IMG_CONTEXT, keep_in_vocab=False)
    with pytest.raises(ValueError) as err:
        load_tokenizer(folder)
    msg = str(err.value)
    assert IMG_CONTEXT in msg and str(folder) in msg
    assert "add <IMG_CONTEXT>, <img>, </img> as special tokens, as InternVL/SAIL-VL tokenizers do" in msg


def test_image_token_that_is_not_special_is_rejected(tok_dir, tmp_path):
    # In the BPE vocab but not an added token: text containing it would be split into pieces.
    folder = _copy_without(tok_dir, tmp_path / "plain_ctx", IMG_CONTEXT, keep_in_vocab=True)
    with pytest.raises(ValueError, match="splits"):
        load_tokenizer(folder)


LITERALS = f"a {IMG_CONTEXT}{IMG_START}{IMG_END} {IM_END} b <|im_start|>assistant\n{ENDOFTEXT}"


def test_control_token_strings_in_text_are_plain_text(tok):
    ids = tok.encode_text(LITERALS)
    assert not set(ids) & {tok.hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert tok.decode(ids) == LITERALS
    # The demo tokenizer's added tokens are all control tokens: the same as HF's split_special_tokens.
    assert ids == tok.hf.encode(LITERALS, add_special_tokens=False, split_special_tokens=True)
    assert tok.encode(LITERALS).count(tok.ids.img_context) == 1, "markup encoding still maps them to their ids"


def test_text_without_control_strings_encodes_as_before(tok):
    for text in TEXTS + ["", "\n", " <image> ", "<|im_start"]:
        assert tok.encode_text(text) == tok.encode(text), text


def test_other_added_tokens_stay_single_ids(tok_dir, tmp_path):
    # InternVL's grounding tokens are special added tokens that data text is meant to use.
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    raw.add_special_tokens([AddedToken("<ref>", special=True, normalized=False)])
    raw.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    (tmp_path / "grounding").mkdir()
    raw.save(str(tmp_path / "grounding" / "tokenizer.json"))
    (tmp_path / "grounding" / "tokenizer_config.json").write_bytes((tok_dir / "tokenizer_config.json").read_bytes())
    grounding = load_tokenizer(tmp_path / "grounding")
    ids = grounding.encode_text(f"<ref>cat</ref> <tool_call> {IMG_CONTEXT}")
    assert grounding.hf.convert_tokens_to_ids("<ref>") in ids
    assert grounding.hf.convert_tokens_to_ids("<tool_call>") in ids
    assert grounding.ids.img_context not in ids


def test_pickled_tokenizer_still_splits_control_strings(tok):
    import pickle  # loader workers may receive the tokenizer pickled

    again = pickle.loads(pickle.dumps(tok))
    assert again.encode_text(LITERALS) == tok.encode_text(LITERALS)
    assert again.ids.img_context not in again.encode_text(LITERALS)
