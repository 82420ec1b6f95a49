"""`sail-convert mcore-to-hf --format transformers`: a trainer checkpoint becomes a folder transformers loads with
its own classes (no remote code) and runs as our megatron model does, prompted as training rendered.

One spawned process writes a trainer run of the `tiny` preset (InternViT + Qwen2, every parameter randomized,
chat template `sailvl-chat`), exports it through the CLI, tokenizes a text+image prompt with the exported
processor and evaluates the megatron model on it; the tests load the folder with `AutoModelForImageTextToText`
and `AutoProcessor` and compare. The chat-template tests check the exported Jinja templates against the
training-time renderer (`ChatTemplate`) token for token.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub

import dataclasses
import io
import json
import shutil
from contextlib import redirect_stderr
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

from sail_megatron.config.presets import get_preset
from sail_megatron.convert import transformers_layout as layout
from sail_megatron.convert.errors import ConversionError
from sail_megatron.data.chat_template import ChatTemplate
from sail_megatron.data.demo_dataset import demo_texts
from sail_megatron.data.sample import VLSample
from sail_megatron.data.templates import TEMPLATES, chat_template_jinja
from sail_megatron.data.tiling import TilePlan, plan_tiles
from sail_megatron.data.tokenizer import build_demo_tokenizer, load_tokenizer
from tests.helpers.multiprocess import run_on_ranks

TEMPLATE = "sailvl-chat"  # unlike chatml in both respects: no newline between turns, a default system message
ATOL = 1e-4
QUESTION = "What is in the picture?"


def _image() -> Image.Image:
    """200 x 100: a 2 x 1 grid of 112-px tiles plus the thumbnail (3 tiles, 48 image tokens)."""
    pixels = np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _randomize(model: torch.nn.Module) -> None:
    """Every parameter random (biases, norms and layer scales too): a swapped tensor cannot hide."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            scale = name.endswith(("ls1", "ls2")) or ("norm" in name and name.endswith("weight"))
            p.copy_(1.0 + 0.1 * noise if scale else 0.08 * noise)


def export_and_read_back(cfg, root: Path, tok: str):
    """A trainer run of `cfg` with random weights (in root/run) -> `--format transformers` export (CLI, to
    root/hf) -> the exported processor's inputs for one prompt -> the megatron model's logits on them (loaded
    as the trainer loads). Returns ({rc, inputs, logits}, the run's TrainConfig); runs in a spawned process."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from transformers import AutoProcessor

    from sail_megatron.config import ParallelConfig, PrecisionConfig
    from sail_megatron.config.data import DataConfig
    from sail_megatron.config.train import TrainConfig, dump
    from sail_megatron.convert import cli
    from sail_megatron.convert.mcore_io import single_process
    from sail_megatron.model.build import build_model
    from sail_megatron.training.checkpoint import load_checkpoint, save_checkpoint
    from tests.convert.workers import _forward

    run, out = root / "run", root / "hf"
    cfg.image_context_token_id = load_tokenizer(tok).ids.img_context
    precision = PrecisionConfig(dtype="fp32")
    with single_process():
        model = build_model(cfg, ParallelConfig(), precision)
        _randomize(model)
        save_checkpoint(run, 3, [model], common={"model_config": dataclasses.asdict(cfg)})
    train = TrainConfig(model=cfg, precision=precision, data=DataConfig(tokenizer=tok, template=TEMPLATE))
    (run / "config.yaml").write_text(dump(train))
    rc = cli.main(["mcore-to-hf", "--ckpt", str(run), "--out", str(out), "--format", "transformers"])

    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[_image()], return_tensors="pt")
    with single_process():
        model = build_model(cfg, ParallelConfig(), precision).eval()
        load_checkpoint(run, [model])
        with torch.no_grad():
            logits = _forward(model, inputs["input_ids"], inputs["pixel_values"])
    return {"rc": rc, "inputs": dict(inputs), "logits": logits[..., : cfg.language.vocab_size]}, train


def _export_and_evaluate(root: str, tok: str) -> dict:
    """Spawned: the tiny preset exported and read back, then the same run described as the tiny AIMv2 model,
    refused in-process before any model is built."""
    from sail_megatron.config.train import dump
    from sail_megatron.convert import cli

    root_dir = Path(root)
    result, train = export_and_read_back(get_preset("tiny"), root_dir, tok)
    aimv2 = root_dir / "run_aimv2"
    shutil.copytree(root_dir / "run", aimv2)
    (aimv2 / "config.yaml").write_text(dump(dataclasses.replace(train, model=get_preset("tiny-aimv2"))))
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        refused_rc = cli.main(
            ["mcore-to-hf", "--ckpt", str(aimv2), "--out", str(root_dir / "no"), "--format", "transformers"]
        )
    return {**result, "refused": (refused_rc, stderr.getvalue(), (root_dir / "no").exists())}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("to_transformers")
    tok = build_demo_tokenizer(demo_texts(), root / "tok", vocab_size=512)  # the tiny preset's 512 rows
    (result,) = run_on_ranks(_export_and_evaluate, 1, str(root), str(tok))
    assert result["rc"] == 0
    return root, result


def test_loads_without_remote_code_and_gives_megatron_logits(exported):
    from transformers import AutoModelForImageTextToText, InternVLForConditionalGeneration

    root, result = exported
    model, info = AutoModelForImageTextToText.from_pretrained(
        root / "hf", dtype=torch.float32, output_loading_info=True
    )
    assert isinstance(model, InternVLForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = result["inputs"]
    assert inputs["pixel_values"].shape[0] == 3  # the image went through the vision tower as 3 tiles
    with torch.no_grad():
        logits = model(**inputs).logits
    diff = (logits - result["logits"]).abs().max().item()
    print(f"max |logit diff| transformers vs megatron: {diff:.2e}")
    assert diff <= ATOL
    assert torch.equal(logits.argmax(-1), result["logits"].argmax(-1))
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1] :]
    assert 1 <= new.numel() <= 4 and generated.shape[0] == 1


def test_processor_gives_the_training_tiles_and_tokens(exported):
    """The exported processor's pixels are the trainer's tiles; its ids are the training renderer's."""
    from sail_megatron.data.decode_pil import cut_tiles, normalize_tiles

    root, result = exported
    cfg = get_preset("tiny")
    size, tokens_per_tile = cfg.vision.image_size, cfg.tokens_per_tile
    plan = plan_tiles(200, 100, 1, 6, size, True)
    tiles = normalize_tiles(cut_tiles(_image(), plan, size))
    assert torch.allclose(result["inputs"]["pixel_values"], tiles, atol=1e-5)
    tok = load_tokenizer(root / "tok")
    ids = _training_ids(tok, TEMPLATE, None, [("user", f"<image>\n{QUESTION}")], [plan], tokens_per_tile)
    assert result["inputs"]["input_ids"][0].tolist() == ids + _generation_prompt(tok)


def test_aimv2_model_is_refused_with_the_field_and_the_fix(exported):
    root, result = exported
    rc, stderr, out_exists = result["refused"]
    assert rc == 2 and not out_exists
    assert "model.vision.arch is 'aimv2'" in stderr and "InternVLVisionModel" in stderr
    assert "Fix: export it with --format internvl-chat" in stderr


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: c.projector.__setattr__("ps_version", "v1"), "model.projector.ps_version is 'v1'"),
        (lambda c: c.projector.__setattr__("layernorm_epsilon", 1e-6), "model.projector.layernorm_epsilon"),
        (
            lambda c: (c.vision.__setattr__("image_size", 84), c.projector.__setattr__("downsample_ratio", 1 / 3)),
            "model.projector.downsample_ratio",
        ),
    ],
)
def test_other_unrepresentable_settings_are_refused(change, field):
    cfg = get_preset("tiny")
    assert layout.unsupported(cfg) == []
    change(cfg)
    cfg.validate()  # a model the trainer runs
    with pytest.raises(ConversionError) as e:
        layout.check_supported(cfg)
    assert field in str(e.value) and "--format internvl-chat" in str(e.value)


def test_export_files(exported):
    root, _ = exported
    out = root / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "internvl" and config["text_config"]["model_type"] == "qwen2"
    assert config["vision_feature_layer"] == -1 and config["image_seq_length"] == 16
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == chat_template_jinja(TEMPLATE) == (out / "chat_template.jinja").read_text()


# ---- chat templates: the exported Jinja renders what training rendered ----

TILES = 2  # tokens per tile in the template tests (any count: the blocks are expanded alike)
PLANS = [TilePlan(1, 1, False), TilePlan(2, 1, True)]
CONVERSATIONS = {
    "system, multi-turn, image": [
        ("system", "You describe photos."),
        ("user", "<image>\nWhat is in the picture?"),
        ("assistant", "A cat on a red sofa."),
        ("user", "What colour is the cat?"),
        ("assistant", "Orange, with white paws."),
    ],
    "two images, default system": [
        ("user", "Image-1: <image>\nImage-2: <image>\nWhich one is brighter?"),
        ("assistant", "The second one."),
    ],
    "text only": [("user", "Tell me a short fact."), ("assistant", "Honey never spoils.")],
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_demo_tokenizer(demo_texts(), tmp_path_factory.mktemp("tok"), vocab_size=512))


def _sample(turns) -> VLSample:
    n = sum(text.count("<image>") for _, text in turns)
    return VLSample(__key__="k", __restore_key__=(), kind="conversation", turns=turns, images=[b"x"] * n)


def _training_ids(tok, name, system_prompt, turns, plans, tokens_per_tile) -> List[int]:
    pieces = ChatTemplate(tok, tokens_per_tile, system_prompt, name).render(_sample(turns), plans)
    return [t for p in pieces for t in p.ids]


def _generation_prompt(tok) -> List[int]:
    return [tok.ids.im_start] + tok.encode_text("assistant\n")


def _jinja_ids(tok, name, system_prompt, messages, plans, generation_prompt=False) -> List[int]:
    """apply_chat_template, then each <image> expanded as the processor expands it, then tokenized."""
    text = tok.hf.apply_chat_template(
        messages,
        chat_template=chat_template_jinja(name, system_prompt),
        add_generation_prompt=generation_prompt,
        tokenize=False,
    )
    for plan in plans:
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * plan.num_tiles * TILES + "</img>", 1)
    return tok.encode(text)


def _messages(turns):
    return [{"role": role, "content": text} for role, text in turns]


@pytest.mark.parametrize("system_prompt", [None, "Answer in one sentence."])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_jinja_template_renders_the_training_tokens(tok, name, conversation, system_prompt):
    turns = CONVERSATIONS[conversation]
    plans = PLANS[: sum(text.count("<image>") for _, text in turns)]
    expected = _training_ids(tok, name, system_prompt, turns, plans, TILES)
    assert _jinja_ids(tok, name, system_prompt, _messages(turns), plans) == expected
    # The prompt a model answers: everything before the last answer, then the open assistant turn.
    prompt = turns[:-1]
    expected = _training_ids(tok, name, system_prompt, prompt, plans, TILES) + _generation_prompt(tok)
    assert _jinja_ids(tok, name, system_prompt, _messages(prompt), plans, generation_prompt=True) == expected


def test_content_parts_render_as_the_placeholder_text(tok):
    """An image part is `<image>\\n` (InternVL's convention), a text part its text."""
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = [{"role": "user", "content": "<image>\nWhat is this?"}]
    for name in TEMPLATES:
        assert _jinja_ids(tok, name, None, parts, PLANS[:1]) == _jinja_ids(tok, name, None, text, PLANS[:1])
