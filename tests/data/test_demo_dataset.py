import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub

import pytest
from PIL import Image

from sail_megatron.data.demo_dataset import DEMO_VOCAB_SIZE, IMAGE_PLACEHOLDER, write_demo_raw
from sail_megatron.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_raw(tmp_path_factory.mktemp("demo"))


def _jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and all(line.strip() for line in lines)
    return [json.loads(line) for line in lines]


def _images_of(record: dict) -> list[str]:
    image = record.get("image")
    return [] if image is None else [image] if isinstance(image, str) else list(image)


def test_images_open_as_rgb_in_both_formats_and_varied_shapes(demo):
    files = sorted(p for p in demo.images_dir.iterdir() if p.suffix in (".jpg", ".png"))
    assert {p.suffix for p in files} == {".jpg", ".png"}
    sizes = []
    for p in files:
        with Image.open(p) as im:
            im.load()
            assert im.mode == "RGB"
            assert im.format == ("JPEG" if p.suffix == ".jpg" else "PNG")
            sizes.append(im.size)
    assert max(max(s) for s in sizes) >= 1000  # at least one large image
    aspects = [w / h for w, h in sizes]
    assert max(aspects) > 2 and min(aspects) < 0.5  # wide and tall ones, so tiling varies
    licences = (demo.images_dir / "LICENSES.md").read_text(encoding="utf-8")
    assert all(f"| {p.name} |" in licences for p in files)


def test_captions(demo):
    records = _jsonl(demo.captions_jsonl)
    assert len(records) >= 35
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert set(r) == {"id", "image", "caption"}
        assert isinstance(r["image"], str) and (demo.images_dir / r["image"]).is_file()
        assert len(r["caption"].split()) >= 5
    # every image in the folder is captioned
    captioned = {r["image"] for r in records}
    assert captioned == {p.name for p in demo.images_dir.iterdir() if p.suffix in (".jpg", ".png")}


def test_sft_llava_format(demo):
    records = _jsonl(demo.sft_jsonl)
    assert len(records) >= 35
    assert len({r["id"] for r in records}) == len(records)
    n_images = []
    for r in records:
        images = _images_of(r)
        n_images.append(len(images))
        for name in images:
            assert (demo.images_dir / name).is_file()
        turns = r["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(t["value"].strip() for t in turns)
        assert sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns) == len(images)
        assert all(IMAGE_PLACEHOLDER not in t["value"] for t in turns if t["from"] == "gpt")
    assert n_images.count(2) >= 3
    assert n_images.count(0) >= 3
    assert any(len(r["conversations"]) >= 6 for r in records)  # multi-turn (3 rounds)


def test_demo_tokenizer_covers_texts(demo):
    tok = load_tokenizer(demo.tokenizer_dir)
    assert tok.vocab_size <= DEMO_VOCAB_SIZE
    captions = [r["caption"] for r in _jsonl(demo.captions_jsonl)]
    for text in captions:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) < len(text) / 3  # compact: well under one token per character
    prompt = tok.encode(f"<|im_start|>user\n{IMAGE_PLACEHOLDER}\nWhat is this?<|im_end|>")
    assert prompt[0] == tok.ids.im_start and prompt[-1] == tok.ids.im_end


def test_writer_is_deterministic(demo, tmp_path):
    again = write_demo_raw(tmp_path / "again")
    ref = sorted(p.relative_to(demo.images_dir.parent) for p in demo.images_dir.parent.rglob("*") if p.is_file())
    new = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert ref == new and len(ref) > 10
    for rel in ref:
        assert (tmp_path / "again" / rel).read_bytes() == (demo.images_dir.parent / rel).read_bytes(), rel
    assert again.tokenizer_dir == tmp_path / "again" / "tokenizer"
