"""`sail-data show` on the demo's raw files: what it prints is what the trainer would train on."""

import json
import os
import re
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub

from pathlib import Path

import pytest
from PIL import Image

from sail_megatron.config.data import DataConfig
from sail_megatron.data.cli import main
from sail_megatron.data.demo_dataset import write_demo_raw
from sail_megatron.data.prepare import _read_file, _Reader
from sail_megatron.data.records import read_records
from sail_megatron.data.sample import cook_vl_sample
from sail_megatron.data.show import report, show_record
from sail_megatron.data.task_encoder import PaddedTaskEncoder
from sail_megatron.data.tiling import plan_tiles
from sail_megatron.data.tokenizer import IMG_CONTEXT, load_tokenizer
from sail_megatron.data.trainer_rules import TrainerRules


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_demo_raw(tmp_path_factory.mktemp("demo") / "raw")


@pytest.fixture(scope="module")
def tok(raw):
    return load_tokenizer(raw.tokenizer_dir)


def _records(path: Path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _multi_image_index(raw) -> int:
    return next(i for i, r in enumerate(_records(raw.sft_jsonl)) if isinstance(r.get("image"), list))


def _show(raw, capsys, *args: str):
    rc = main(["show", "--images", str(raw.images_dir), "--tokenizer", str(raw.tokenizer_dir), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _tiles(raw, name: str, max_tiles: int = 6) -> int:
    with Image.open(raw.images_dir / name) as im:
        return plan_tiles(*im.size, max_tiles=max_tiles).num_tiles


def test_prints_the_marked_text_with_real_image_block_lengths(raw, capsys):
    index = _multi_image_index(raw)
    record = _records(raw.sft_jsonl)[index]
    rc, out, _ = _show(raw, capsys, "--input", str(raw.sft_jsonl), "--index", str(index), "--template", "sailvl-chat")
    assert rc == 0
    tiles = [_tiles(raw, name) for name in record["image"]]
    blocks = re.findall(r"<img><IMG_CONTEXT>x(\d+) \((\d+) tiles?\)</img>", out)
    assert [(int(n), int(t)) for n, t in blocks] == [(256 * t, t) for t in tiles]
    assert IMG_CONTEXT * 2 not in out, "image blocks are abbreviated"
    assert "\x1b[" not in out, "no colour when stdout is not a terminal"
    answers = [c["value"] for c in record["conversations"] if c["from"] == "gpt"]
    assert re.findall(r"\[\[(.*?)\]\]", out, re.S) == [a + "<|im_end|>" for a in answers]
    assert out.startswith("<|im_start|>system\n") and "<|im_end|><|im_start|>user\n" in out  # sailvl-chat: no newline
    summary = out.strip().splitlines()[-1]
    assert f"{sum(tiles)} tiles in 2 images" in summary and "template sailvl-chat" in summary


def test_json_is_what_the_task_encoder_makes_of_the_prepared_entry(raw, tok, capsys):
    index = _multi_image_index(raw)
    args = ["--input", str(raw.sft_jsonl), "--index", str(index), "--template", "internvl2_5", "--max-tiles", "4"]
    rc, out, _ = _show(raw, capsys, *args, "--system-prompt", "Be brief.", "--json")
    assert rc == 0
    shown = json.loads(out)
    assert set(shown) == {"input_ids", "loss_mask", "text"}

    # The entry `sail-data prepare` writes for this record, cooked and encoded by the trainer's encoder.
    rec = next(r for r in read_records(raw.sft_jsonl) if r.index == index)
    reader = _Reader("llava", raw.images_dir, 64_000_000, False, False, TrainerRules.structural(), _read_file)
    meta_json, images, *_ = reader(rec)
    entry = {"__key__": "k", "__restore_key__": (), "json": meta_json}
    entry.update({f"img{i}.{ext}": data for i, (data, ext) in enumerate(images)})
    cfg = DataConfig(
        path="-", tokenizer="-", template="internvl2_5", system_prompt="Be brief.", max_tiles=4, seq_length=100_000
    )
    enc = PaddedTaskEncoder(cfg, tok, tile_size=448, tokens_per_tile=256).encode_sample(cook_vl_sample(entry))
    assert shown["input_ids"] == enc.tokens.tolist() + enc.labels[-1:].tolist()
    assert shown["loss_mask"] == [0] + enc.loss_mask.int().tolist()
    assert shown["text"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "[[" not in shown["text"]


def test_caption_records_are_recognized(raw, capsys):
    caption = _records(raw.captions_jsonl)[3]
    rc, out, _ = _show(raw, capsys, "--input", str(raw.captions_jsonl), "--index", "3", "--max-tiles", "2")
    assert rc == 0
    t = _tiles(raw, caption["image"], max_tiles=2)
    assert out.startswith(f"<img><IMG_CONTEXT>x{256 * t} ({t} tile") and f"[[{caption['caption']}<|im_end|>]]" in out


def test_colour_on_a_terminal(raw):
    shown, tok = show_record(raw.sft_jsonl, raw.tokenizer_dir, images_dir=raw.images_dir, template="sailvl-chat")
    text = report(shown, tok, color=True)
    assert "\x1b[32m" in text and "[[" not in text
    answer = _records(raw.sft_jsonl)[0]["conversations"][1]["value"]
    assert f"\x1b[32m{answer}<|im_end|>\x1b[0m" in text


def test_seq_length_applies_the_over_length_policy(raw, capsys):
    args = ["--input", str(raw.sft_jsonl), "--index", "0", "--tokens-per-tile", "16", "--seq-length", "120"]
    rc, out, _ = _show(raw, capsys, *args, "--json")
    assert rc == 0 and len(json.loads(out)["input_ids"]) <= 121  # seq_length inputs + the last label
    rc, out, _ = _show(raw, capsys, *args)
    assert "over --seq-length: dropped_rounds 2" in out.splitlines()[-1]  # 3 rounds, the first is kept


def _tokenizer_without_image_context(raw, folder: Path) -> Path:
    folder.mkdir()
    spec = json.loads((raw.tokenizer_dir / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != IMG_CONTEXT]
    del spec["model"]["vocab"][IMG_CONTEXT]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(raw.tokenizer_dir / "tokenizer_config.json", folder)
    return folder


@pytest.mark.parametrize(
    "case,argument",
    [
        ("missing input", "--input"),
        ("index out of range", "--index"),
        ("negative index", "--index"),
        ("tokenizer without image tokens", "--tokenizer"),
        ("tokenizer folder missing", "--tokenizer"),
        ("images elsewhere", "--images"),
        ("max tiles", "--max-tiles"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(raw, tmp_path, capsys, case, argument):
    args = {
        "--input": str(raw.sft_jsonl),
        "--tokenizer": str(raw.tokenizer_dir),
        "--images": str(raw.images_dir),
        "--index": "0",
    }
    if case == "missing input":
        args["--input"] = str(tmp_path / "nope.jsonl")
    elif case == "index out of range":
        args["--index"] = "100000"
    elif case == "negative index":
        args["--index"] = "-1"
    elif case == "tokenizer without image tokens":
        args["--tokenizer"] = str(_tokenizer_without_image_context(raw, tmp_path / "tok"))
    elif case == "tokenizer folder missing":
        args["--tokenizer"] = str(tmp_path / "no_tok")
    elif case == "images elsewhere":
        args["--images"] = str(tmp_path)
    elif case == "max tiles":
        args["--max-tiles"] = "0"
    rc = main(["show", *(x for kv in args.items() for x in kv)])
    out, err = capsys.readouterr()
    assert rc == 2 and not out
    assert err.startswith(f"sail-data: error: {argument}") and len(err.splitlines()) <= 2, err
    if case == "tokenizer without image tokens":
        assert IMG_CONTEXT in err


def test_unknown_template_exits_2(raw, capsys):
    with pytest.raises(SystemExit) as e:
        main(["show", "--input", str(raw.sft_jsonl), "--tokenizer", str(raw.tokenizer_dir), "--template", "vicuna"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--template" in err and "sailvl-chat" in err


def test_the_command_line_entry_point(raw):
    import subprocess
    import sys

    args = ["--input", str(raw.sft_jsonl), "--images", str(raw.images_dir), "--tokenizer", str(raw.tokenizer_dir)]
    cmd = [sys.executable, "-m", "sail_megatron.data.cli", "show", *args, "--template", "sailvl-chat"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "[[" in done.stdout and "template sailvl-chat" in done.stdout
