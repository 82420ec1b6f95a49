"""Each chat template renders, token for token, what its upstream `get_prompt` builds.

The expected prompts come from a transcription of the upstream registries (InternVL's conversation.py
MPT and CHATML styles, SAIL-VL's `sailvl-chat` as ms-swift registers it), independent of
sail_megatron/data/templates.py: the system messages and separators are written out here again.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub

from typing import List, Optional, Tuple

import pytest
import torch

from sail_megatron.config import ConfigError
from sail_megatron.config.data import TEMPLATES as CONFIG_TEMPLATES
from sail_megatron.config.data import DataConfig
from sail_megatron.data.chat_template import ChatTemplate
from sail_megatron.data.demo_dataset import DEMO_VOCAB_SIZE, demo_texts
from sail_megatron.data.sample import VLSample
from sail_megatron.data.task_encoder import build_task_encoder
from sail_megatron.data.templates import TEMPLATES
from sail_megatron.data.tiling import TilePlan
from sail_megatron.data.tokenizer import build_demo_tokenizer, load_tokenizer

SYSTEM_TEMPLATE = "<|im_start|>system\n{system_message}"
# (style, default system message, roles, sep) per template, as the upstream registries write them.
UPSTREAM = {
    # Qwen chatml without a default system: InternVL's SeparatorStyle.CHATML (e.g. `qwen-7b-chat`).
    "chatml": ("chatml", None, ("<|im_start|>user", "<|im_start|>assistant"), "<|im_end|>"),
    # SAIL-VL-1.6's conversation.py (name='sailvl-chat'); the same in ms-swift's SAIL-VL template.
    "sailvl-chat": (
        "mpt",
        "你是由抖音内容理解组开发的多模态大模型，英文名叫UniVL, 是一个有用无害的人工智能助手。",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "<|im_end|>",
    ),
    # SAIL-VL2's conversation.py (name='univl-chat').
    "univl-chat": (
        "mpt",
        "你是由抖音内容理解组开发的多模态大模型，英文名叫UniVL, 是一个有用无害的人工智能助手。",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "<|im_end|>",
    ),
    # InternVL 2.5 (OpenGVLab/InternVL internvl_chat/internvl/conversation.py, name='internvl2_5').
    "internvl2_5": (
        "mpt",
        "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "<|im_end|>\n",
    ),
}

TOKENS_PER_TILE = 4
PLANS = [TilePlan(1, 1, False), TilePlan(2, 2, False), TilePlan(2, 1, True)]  # 1, 4 and 3 tiles
TURNS = [
    ("user", "Image-1: <image>\nImage-2: <image>\nWhich image is in colour?"),
    ("assistant", "The first one. The second is black and white."),
    ("user", "What animal is in the first one?"),
    ("assistant", "A cat: a short-haired brown tabby."),
    ("user", "<image>\nAnd what stands here?"),
    ("assistant", "A white rocket on the launch pad at dusk."),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_demo_tokenizer(demo_texts(), tmp_path_factory.mktemp("tok"), DEMO_VOCAB_SIZE))


def upstream_prompt(name: str, system: Optional[str], messages: List[Tuple[str, str]]) -> Tuple[str, List[int]]:
    """The upstream get_prompt string, and the character offsets where each assistant message starts."""
    style, _, roles, sep = UPSTREAM[name]
    starts = []
    if style == "mpt":  # ret = system_prompt + sep; then role + message + sep per message
        ret = SYSTEM_TEMPLATE.format(system_message=system) + sep
        for role, message in messages:
            ret += roles[role == "assistant"]
            if role == "assistant":
                starts.append(len(ret))
            ret += message + sep
    else:  # CHATML: ret = '' if no system else system_prompt + sep + '\n'; then role + '\n' + message + sep + '\n'
        ret = "" if system is None else SYSTEM_TEMPLATE.format(system_message=system) + sep + "\n"
        for role, message in messages:
            ret += roles[role == "assistant"] + "\n"
            if role == "assistant":
                starts.append(len(ret))
            ret += message + sep + "\n"
    return ret, starts


def with_image_blocks(prompt: str, plans: List[TilePlan]) -> str:
    """InternVL: each <image>, in order, becomes <img> + <IMG_CONTEXT> * n + </img>."""
    for plan in plans:
        prompt = prompt.replace("<image>", "<img>" + "<IMG_CONTEXT>" * plan.num_tiles * TOKENS_PER_TILE + "</img>", 1)
    return prompt


def _sample(turns, n_images: int) -> VLSample:
    return VLSample(__key__="k", __restore_key__=(), kind="conversation", turns=turns, images=[b"x"] * n_images)


def _full(enc) -> List[int]:
    return torch.cat([enc.tokens, enc.labels[-1:]]).tolist()


# system source -> (system_prompt argument, extra leading turn, system message upstream renders)
SYSTEMS = {
    "template default": (None, [], "default"),
    "data.system_prompt": ("Answer briefly.", [], "Answer briefly."),
    "sample system turn": ("Answer briefly.", [("system", "You see photos.")], "You see photos."),
}


@pytest.mark.parametrize("system_source", sorted(SYSTEMS))
@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_renders_the_upstream_prompt_token_for_token(tok, name, system_source):
    system_prompt, lead, expected_system = SYSTEMS[system_source]
    if expected_system == "default":
        expected_system = UPSTREAM[name][1]
    template = ChatTemplate(tok, TOKENS_PER_TILE, system_prompt, name)
    enc = template.encode(_sample(lead + TURNS, len(PLANS)), [b"a", b"b", b"c"], PLANS, 4096)

    prompt, starts = upstream_prompt(name, expected_system, TURNS)
    expected = tok.encode(with_image_blocks(prompt, PLANS))
    assert _full(enc) == expected
    assert expected.count(tok.ids.img_context) == 8 * TOKENS_PER_TILE

    # The loss mask covers exactly each answer and its <|im_end|>.
    trained = torch.zeros(len(expected), dtype=torch.bool)
    answers = [text for role, text in TURNS if role == "assistant"]
    for start, answer in zip(starts, answers):
        begin = len(tok.encode(with_image_blocks(prompt[:start], PLANS)))
        n = len(tok.encode(answer + "<|im_end|>"))
        assert expected[begin : begin + n] == tok.encode(answer + "<|im_end|>")
        trained[begin : begin + n] = True
    assert torch.equal(enc.loss_mask, trained[1:])
    assert tok.decode(enc.labels[enc.loss_mask].tolist()) == "".join(a + "<|im_end|>" for a in answers)


def test_what_follows_im_end(tok):
    for name, after in (("sailvl-chat", "<|im_start|>"), ("internvl2_5", "\n"), ("chatml", "\n")):
        full = _full(
            ChatTemplate(tok, TOKENS_PER_TILE, template=name).encode(_sample(TURNS, 3), [b""] * 3, PLANS, 4096)
        )
        ends = [i for i, t in enumerate(full) if t == tok.ids.im_end]
        assert len(ends) == (6 if name == "chatml" else 7)  # no default system turn in chatml
        follows = {tok.decode(full[i + 1 : i + 2]) for i in ends[:-1]}
        assert follows == {after}, name
        assert full[-1] == (tok.ids.im_end if name == "sailvl-chat" else tok.encode("\n")[0])


def test_empty_system_prompt_drops_the_system_turn(tok):
    for name in UPSTREAM:
        enc = ChatTemplate(tok, TOKENS_PER_TILE, "", name).encode(_sample(TURNS, 3), [b""] * 3, PLANS, 4096)
        assert tok.decode(_full(enc)).startswith("<|im_start|>user\n"), name


def test_captions_render_alike_in_every_template(tok):
    sample = VLSample(
        __key__="k", __restore_key__=(), kind="caption", turns=[("caption", "A cat sits on a red mat.")], images=[b"x"]
    )
    encoded = [ChatTemplate(tok, TOKENS_PER_TILE, template=n).encode(sample, [b"x"], PLANS[2:], 512) for n in UPSTREAM]
    for enc in encoded[1:]:
        assert torch.equal(enc.tokens, encoded[0].tokens) and torch.equal(enc.loss_mask, encoded[0].loss_mask)
    assert tok.decode(_full(encoded[0])).endswith("</img>\nA cat sits on a red mat.<|im_end|>")


def test_template_names_match_the_config(tok):
    assert set(TEMPLATES) == set(CONFIG_TEMPLATES) == set(UPSTREAM)
    assert DataConfig().template == "chatml"
    with pytest.raises(ValueError, match="sailvl-chat"):
        ChatTemplate(tok, TOKENS_PER_TILE, template="vicuna")


def test_config_rejects_unknown_templates():
    cfg = DataConfig(path="d", tokenizer="t", template="qwen")
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert e.value.field == "data.template"
    assert all(name in str(e.value) for name in CONFIG_TEMPLATES)
    DataConfig(path="d", tokenizer="t", template="sailvl-chat").validate()


def test_the_task_encoder_uses_the_configured_template(tok):
    for packing in (True, False):
        cfg = DataConfig(path="d", tokenizer="t", template="sailvl-chat", system_prompt="Be brief.", packing=packing)
        encoder = build_task_encoder(cfg, tok, tile_size=448, tokens_per_tile=TOKENS_PER_TILE)
        assert encoder.template.spec.name == "sailvl-chat" and encoder.template.system_prompt == "Be brief."
