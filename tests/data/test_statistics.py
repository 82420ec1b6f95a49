"""Measured tokens per sample: prepare with a recipe records what the trainer's task encoder makes of every
written record; `token_statistics` and `sail-data stats` read it back for a folder or a blend."""

import json
import shutil
import tarfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from sail_megatron.config.counts import format_count
from sail_megatron.data.blend import write_blend
from sail_megatron.data.cli import main as sail_data
from sail_megatron.data.prepare import prepare
from sail_megatron.data.statistics import token_statistics
from sail_megatron.data.trainer_rules import TrainerRules
from tests.data.prepare_inputs import llava, write_jsonl
from tests.data.test_image_io import encode, noise

RECIPE = Path(__file__).resolve().parents[2] / "examples/configs/tiny/demo.yaml"  # tiles of 112 px, max 4
# (width, height): one tile, a 2x1 grid (+ thumbnail), a 3x1 grid (+ thumbnail).
SIZES = {"small.jpg": (64, 48), "wide.jpg": (224, 112), "wider.jpg": (336, 112)}


def _records(n: int) -> list:
    """Records with 0, 1 or 2 images of several tile counts and texts of several lengths; the first one's
    answer is longer than the recipe's seq_length."""
    names = list(SIZES)
    out = [llava("long", "small.jpg", answer="what is this picture " * 300)]
    for i in range(n):
        images = [names[i % 3]] * (i % 3)
        text = " ".join(["<image>"] * len(images) + ["what is this picture"] * (1 + i % 5))
        out.append(llava(f"r{i}", images or None, text=text, answer="a picture " * (1 + 3 * i)))
    return out


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """Two input shards of synthetic records, prepared with the tiny recipe (`part0`, `part1`: shards of 2
    samples, the last one held out as the val split), and `bare`, `part1`'s records prepared without one."""
    from sail_megatron.data.tokenizer import build_demo_tokenizer

    root = tmp_path_factory.mktemp("stats")
    images = root / "images"
    images.mkdir()
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        (images / name).write_bytes(encode(noise(w, h, seed=i), "JPEG", quality=90))
    tok = build_demo_tokenizer(["what is this picture", "a picture"] * 10, root / "tok", vocab_size=300)
    rules = TrainerRules.from_recipe(RECIPE, [f"data.tokenizer={tok}"])
    src = write_jsonl(root / "in.jsonl", _records(15))
    common = dict(progress=False, workers=2, shard_size=2, valid_fraction=0.25, num_shards=2)
    runs = [dict(out_dir=root / f"part{i}", shard_index=i, rules=rules) for i in range(2)]
    runs.append(dict(out_dir=root / "bare", shard_index=1))
    # Each run waits seconds on energon's own prepare (a process of its own): run them side by side.
    with ThreadPoolExecutor(len(runs)) as pool:
        summaries = [report.summary() for report in pool.map(lambda run: prepare(src, images, **run, **common), runs)]
    return root, tok, summaries


def _report(folder: Path) -> dict:
    return json.loads((folder / "prepare_report.json").read_text())


def _encoded_by_split(folder: Path, tok_dir: Path) -> dict:
    """{split: [(tokens, image tokens, tiles)]}: the trainer's task encoder on the written shards, and the
    image tokens counted in its output."""
    import braceexpand

    from sail_megatron.config.train import load_train_config
    from sail_megatron.data.sample import cook_vl_sample
    from sail_megatron.data.task_encoder import PaddedTaskEncoder
    from sail_megatron.data.tokenizer import load_tokenizer

    cfg = load_train_config(RECIPE, [f"data.tokenizer={tok_dir}"])
    tok = load_tokenizer(tok_dir)
    encoder = PaddedTaskEncoder(cfg.data, tok, cfg.model.vision.image_size, cfg.model.tokens_per_tile)
    parts = yaml.safe_load((folder / ".nv-meta" / "split.yaml").read_text())["split_parts"]
    split_of = {name: part for part, names in parts.items() for n in names for name in braceexpand.braceexpand(n)}
    out = defaultdict(list)
    for shard in sorted(folder.glob("shard-*.tar")):
        entries = defaultdict(dict)
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                entries[key][ext] = tar.extractfile(m).read()
        for key, raw in sorted(entries.items()):
            enc = encoder.encode_sample(cook_vl_sample({"__key__": key, "__restore_key__": (), **raw}))
            image_tokens = int((enc.tokens == tok.ids.img_context).sum())
            out[split_of[shard.name]].append((enc.num_tokens, image_tokens, enc.num_tiles))
    return out


def _sums(rows) -> dict:
    return {
        "samples": len(rows),
        "tokens": sum(r[0] for r in rows),
        "image_tokens": sum(r[1] for r in rows),
        "tiles": sum(r[2] for r in rows),
    }


def _train(folder: Path) -> dict:
    return _report(folder)["token_statistics"]["splits"]["train"]


def test_report_holds_what_the_task_encoder_makes_of_the_written_records(rig):
    root, tok, summaries = rig
    section = _report(root / "part0")["token_statistics"]
    means = f"{section['mean_tokens_per_sample']:.1f} tokens and {section['mean_tiles_per_sample']:.2f} tiles"
    assert f"measured: {means} per sample" in summaries[0] and "measured" not in summaries[2]  # (no recipe)
    encoded = _encoded_by_split(root / "part0", tok)
    assert set(encoded) == {"train", "val"} and set(section["splits"]) == {"train", "val"}
    every = [row for rows in encoded.values() for row in rows]
    assert 512 in {row[0] for row in every}, "the long record is measured as cut to seq_length"
    assert len({row[2] for row in every}) >= 3, "records of several tile counts"
    for part, rows in [("all", every), *encoded.items()]:
        got = section if part == "all" else section["splits"][part]
        sums = _sums(rows)
        assert {k: got[k] for k in sums} == sums, part
        assert got["mean_tokens_per_sample"] == pytest.approx(sums["tokens"] / sums["samples"])
        assert got["mean_tiles_per_sample"] == pytest.approx(sums["tiles"] / sums["samples"])
        assert got["image_tokens"] == 16 * got["tiles"]  # tokens per tile of the tiny model
    assert section["measured_with"].startswith(f"recipe {RECIPE}") and "seq_length 512" in section["measured_with"]

    stats = token_statistics(root / "part0")  # the train split, what training draws
    train = _sums(encoded["train"])
    assert stats.samples_measured == train["samples"] and stats.complete
    assert stats.coverage() == "measured on 1 of 1 dataset"
    assert stats.mean_tokens_per_sample == pytest.approx(train["tokens"] / train["samples"])
    assert stats.mean_image_tokens_per_sample == pytest.approx(train["image_tokens"] / train["samples"])
    assert stats.mean_tiles_per_sample == pytest.approx(train["tiles"] / train["samples"])
    assert stats.source == section["measured_with"]
    assert token_statistics(root / "part0", split="val").samples_measured == len(encoded["val"])
    assert stats.tokens_for(21_000_000) == round(21_000_000 * stats.mean_tokens_per_sample)


def test_without_a_recipe_nothing_is_measured(rig, capsys):
    root, *_ = rig
    assert _report(root / "bare")["token_statistics"] is None
    assert token_statistics(root / "bare") is None
    assert sail_data(["stats", str(root / "bare")]) == 2
    err = capsys.readouterr().err
    assert "no token statistics: it was prepared without --recipe" in err
    assert "re-run `sail-data prepare` with --recipe" in err
    assert sail_data(["stats", str(write_blend(root / "blend-bare.yaml", {"bare": 1.0}))]) == 2
    assert "none of its datasets was prepared with --recipe" in capsys.readouterr().err


def test_a_blend_is_weighted_by_its_sampling_weights(rig):
    root, *_ = rig
    a, b = _train(root / "part0"), _train(root / "part1")
    ma, mb = a["mean_tokens_per_sample"], b["mean_tokens_per_sample"]
    assert ma != pytest.approx(mb)
    both = write_blend(root / "blend-ab.yaml", {"part0": 3.0, "part1": 1.0})
    stats = token_statistics(both)
    assert stats.mean_tokens_per_sample == pytest.approx((3 * ma + mb) / 4)
    assert stats.complete and (stats.datasets, stats.datasets_measured) == (2, 2)
    assert stats.samples_measured == a["samples"] + b["samples"]

    # A dataset prepared without a recipe: the means cover the others, and say so.
    partial = token_statistics(write_blend(root / "blend-abx.yaml", {"part0": 3.0, "part1": 1.0, "bare": 1.0}))
    assert partial.mean_tokens_per_sample == pytest.approx((3 * ma + mb) / 4)
    assert not partial.complete and partial.unmeasured == (str(root / "bare"),)
    assert partial.weight_measured == pytest.approx(0.8)
    assert partial.coverage() == "measured on 2 of 3 datasets (80.0 % of the sampling weight)"
    assert token_statistics(write_blend(root / "blend-x.yaml", {"bare": 1.0})) is None

    # Nested blends weigh as energon samples them: the inner blend's share is split by its own weights.
    nested = root / "nested.yaml"
    inner = [{"weight": 1.0, "path": "blend-ab.yaml"}, {"weight": 1.0, "path": "part1"}]
    nested.write_text(yaml.safe_dump({"splits": {"train": {"blend": inner}}}))
    assert token_statistics(nested).mean_tokens_per_sample == pytest.approx(0.5 * (3 * ma + mb) / 4 + 0.5 * mb)
    assert token_statistics(nested).datasets == 2  # part1, named twice, is one dataset
    # blend_epochized: repetitions x samples.
    epochs = root / "epochs.yaml"
    reps = [{"repetitions": 2, "path": "part0"}, {"repetitions": 1, "path": "part1"}]
    epochs.write_text(yaml.safe_dump({"splits": {"train": {"blend_epochized": reps}}}))
    expected = (2 * a["tokens"] + b["tokens"]) / (2 * a["samples"] + b["samples"])
    assert token_statistics(epochs).mean_tokens_per_sample == pytest.approx(expected)


def test_joined_parts_give_the_statistics_of_all_their_samples(rig, capsys):
    root, *_ = rig
    blend = root / "joined.yaml"
    assert sail_data(["join", "--parts", str(root / "part0"), str(root / "part1"), "--out", str(blend)]) == 0
    out = capsys.readouterr().out
    a, b = _train(root / "part0"), _train(root / "part1")
    stats = token_statistics(blend)
    assert stats.samples_measured == a["samples"] + b["samples"]
    assert stats.mean_tokens_per_sample == pytest.approx((a["tokens"] + b["tokens"]) / stats.samples_measured)
    assert stats.mean_tiles_per_sample == pytest.approx((a["tiles"] + b["tiles"]) / stats.samples_measured)
    assert f"{stats.mean_tokens_per_sample:.1f} tokens" in out and "measured on 2 of 2 datasets" in out


def test_stats_command(rig, capsys):
    root, *_ = rig
    stats = token_statistics(root / "part0")
    assert sail_data(["stats", str(root / "part0"), "--samples", "21M"]) == 0
    out = capsys.readouterr().out
    assert f"{stats.mean_tokens_per_sample:.1f} tokens" in out and f"{stats.mean_tiles_per_sample:.2f} tiles" in out
    assert f"over {stats.samples_measured} samples, measured with recipe {RECIPE}" in out
    tokens = stats.tokens_for(21_000_000)
    assert f"21M samples ~ {format_count(tokens)} tokens ({tokens})" in out

    blend = write_blend(root / "blend-cli.yaml", {"part0": 1.0, "part1": 1.0, "bare": 2.0})
    assert sail_data(["stats", str(blend), "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["complete"] is False and doc["datasets_measured"] == 2 and doc["unmeasured"] == [str(root / "bare")]
    assert doc["mean_tokens_per_sample"] == pytest.approx(token_statistics(blend).mean_tokens_per_sample)
    assert "warning: measured on 2 of 3 datasets (50.0 % of the sampling weight)" in captured.err
    assert "--recipe" in captured.err

    # A report whose statistics were edited by hand is refused, naming it.
    edited = root / "edited"
    shutil.copytree(root / "part1", edited)
    report = _report(edited)
    report["token_statistics"]["splits"]["train"]["samples"] = 0
    (edited / "prepare_report.json").write_text(json.dumps(report))
    assert sail_data(["stats", str(edited)]) == 2
    assert f"{edited}/prepare_report.json: no readable token_statistics" in capsys.readouterr().err

    for path, message in [
        (root / "missing", "does not exist"),
        (root / "images", "is not a prepared dataset"),
        (root / "in.jsonl", "is neither a dataset folder nor a blend YAML"),
    ]:
        assert sail_data(["stats", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sail-data: error: PATH: ") and message in err and "sail-data prepare" in err
