"""sail-data index: img2dataset-style shards trained where they lie. Metadata in place or beside read-only data,
records checked with prepare's rules and reported by reason, and the loader cooking these shards into the same
samples as prepared ones: bad records skipped and counted, blends with prepared data, resume mid-shard."""

import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from sail_megatron.data.blend import join_parts, write_blend
from sail_megatron.data.cli import main as sail_data
from sail_megatron.data.img2dataset import cook_img2dataset_sample, dataset_yaml
from sail_megatron.data.index import INDEX_REPORT, IndexingError, _picks, index
from sail_megatron.data.out_dir import OutputError
from sail_megatron.data.prepare import prepare
from sail_megatron.data.sample import cook_vl_sample
from sail_megatron.data.statistics import token_statistics
from sail_megatron.data.trainer_rules import TrainerRules
from tests.data.img2dataset_inputs import bad_records, good, photo, snapshot, write_shards
from tests.data.prepare_inputs import write_jsonl
from tests.data.test_loader import _loader, tokenizer_dir  # noqa: F401 (fixture)

RECIPE = Path(__file__).resolve().parents[2] / "examples/configs/tiny/demo.yaml"
_BAD = bad_records()
EXPECTED = Counter(reason for _, reason in _BAD.values() if reason)  # one record of each
N_VALID_TRAIN = 10  # good0..7 and the png and webp records: shards 0 and 1 (shard 2 is the val split)


def _crawl_shards():
    b = {name: parts for name, (parts, _) in _BAD.items()}
    return [
        [good(0), b["png"], b["no_image"], good(1), b["no_caption"], b["webp"], b["empty_caption"], good(2)],
        [b["truncated"], good(3), b["not_an_image"], good(4), b["two_images"], good(5), good(6), good(7)],
        [good(8), good(9), good(10), good(11)],
    ]


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    """A read-only crawl (3 shards, 6 bad records) and its --meta folder: (source, meta)."""
    root = tmp_path_factory.mktemp("crawl")
    src = write_shards(root / "crawl", _crawl_shards())
    report = index(src, meta=root / "crawl-meta", check="all", valid_fraction=0.3, progress=False, workers=2)
    assert report.by_reason() == EXPECTED
    return src, root / "crawl-meta"


def test_cooker_gives_the_prepared_caption_sample():
    parts = good(3, caption="  a photograph of a rocket \n")
    raw = {"__key__": "k", "__restore_key__": (), "__subflavors__": dataset_yaml("txt")["subflavors"], **parts}
    ours = cook_img2dataset_sample(raw)
    meta = {"kind": "caption", "turns": [{"role": "caption", "text": "a photograph of a rocket"}], "num_images": 1}
    prepared = cook_vl_sample(
        {"__key__": "k", "__restore_key__": (), "json": json.dumps(meta), "img0.jpg": parts["jpg"]}
    )
    assert (ours.kind, ours.turns, ours.images) == (prepared.kind, prepared.turns, prepared.images)
    from_json = cook_img2dataset_sample({**raw, "__subflavors__": dataset_yaml("json:caption")["subflavors"]})
    assert from_json.turns == ours.turns
    base = {k: v for k, v in raw.items() if k.startswith("__")}
    for name, (parts, reason) in _BAD.items():
        sample = cook_img2dataset_sample({**base, **parts})
        if reason in ("no_image", "no_caption", "empty_caption", "several_images"):
            assert (sample.kind, sample.turns[0][0]) == ("malformed", reason), name


def test_index_in_place_reports_bad_records_like_prepare(crawl, tmp_path):
    src = shutil.copytree(crawl[0], tmp_path / "crawl")
    report = index(src, check="all", valid_fraction=0.3, progress=False, workers=2)
    assert (report.samples, report.shards, report.checked) == (20, 3, 20)
    assert report.by_reason() == EXPECTED
    assert report.split_samples == {"train": 16, "val": 4, "test": 0}
    assert report.image_parts == {"jpg": 12, "png": 1, "webp": 1}
    assert {s.source for s in report.skipped} >= {"00000.tar/000000002", "00001.tar/000010000"}
    saved = json.loads((src / INDEX_REPORT).read_text())
    assert saved["skipped_by_reason"] == dict(EXPECTED) and saved["command"] == "sail-data index"
    assert yaml.safe_load((src / ".nv-meta/dataset.yaml").read_text()) == dataset_yaml("txt")
    assert sorted(p.name for p in src.glob("*.tar.idx")) == ["00000.tar.idx", "00001.tar.idx", "00002.tar.idx"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        index(src, progress=False)
    again = index(src, check=5, overwrite=True, progress=False, workers=2)  # a spread sample, re-indexed
    assert again.checked == 5 and not list(src.glob(".*old*"))
    shutil.rmtree(src / ".nv-meta")
    (src / INDEX_REPORT).unlink()
    (src / ".nv-meta").mkdir()  # energon metadata of someone else's
    with pytest.raises(OutputError, match="did not write"):
        index(src, overwrite=True, progress=False)


def test_meta_folder_leaves_read_only_source_untouched(crawl, tmp_path, capsys):
    src = shutil.copytree(crawl[0], tmp_path / "crawl")
    for p in [src, *src.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    before = snapshot(src)
    try:
        meta = tmp_path / "meta"
        assert sail_data(["index", str(src), "--meta", str(meta), "--check", "all", "--valid-fraction", "0.3"]) == 0
        out = capsys.readouterr().out
        assert "checked all: 14 usable, 6 skipped" in out and "skipped      1 x no_image" in out
        assert f"data.path: {meta.resolve()}" in out
        assert all((meta / f"0000{i}.tar").is_symlink() for i in range(3))
        assert sail_data(["index", str(src)]) == 2  # in place: refused, pointing at --meta
        assert "--meta" in capsys.readouterr().err
        assert sail_data(["index", str(src), "--meta", str(src / "meta")]) == 2
        assert sail_data(["index", str(src), "--meta", str(meta)]) == 2  # exists: needs --overwrite
        assert sail_data(["index", str(src), "--meta", str(meta), "--overwrite", "--check", "3"]) == 0
        assert snapshot(src) == before
    finally:
        for p in [src, *src.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_loader_reads_indexed_shards_and_counts_skips(crawl, tokenizer_dir, caplog):  # noqa: F811
    caplog.set_level(logging.WARNING, logger="sail_megatron.data.task_encoder")
    it = iter(_loader(crawl[1], tokenizer_dir))
    batches = [next(it) for _ in range(N_VALID_TRAIN + 1)]  # one epoch, and a batch carrying the last counts
    keys = [b.keys[0] for b in batches[:N_VALID_TRAIN]]
    assert len(set(keys)) == N_VALID_TRAIN and all(k.startswith("crawl-meta/0000") for k in keys)
    skipped = sum((Counter(b.skipped) for b in batches), Counter())
    assert set(skipped) == set(EXPECTED)
    assert all(n <= skipped[reason] <= 2 * n for reason, n in EXPECTED.items()), skipped
    assert any("crawl-meta/00000.tar/000000002: no_image" in r.getMessage() for r in caplog.records)
    assert all(b.loss_mask.sum() > 0 and len(b.images) == 1 for b in batches), "a caption trained on, one image"


def test_blend_mixes_indexed_and_prepared(crawl, tokenizer_dir, tmp_path):  # noqa: F811
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"p{i}.jpg").write_bytes(photo(i))
    records = write_jsonl(
        tmp_path / "captions.jsonl", [{"image": f"p{i % 4}.jpg", "caption": f"photo {i}"} for i in range(8)]
    )
    prepare(records, images, tmp_path / "prepared", fmt="caption", shard_size=4, progress=False)
    indexed = os.path.relpath(crawl[1], tmp_path)
    blend = write_blend(tmp_path / "blend.yaml", {indexed: 1.0, "prepared": 1.0})
    it = iter(_loader(blend, tokenizer_dir, shuffle=8))
    batches = [next(it) for _ in range(40)]
    sources = Counter(b.keys[0].split("/")[0] for b in batches)
    assert set(sources) == {"crawl-meta", "prepared"}, sources
    assert set().union(*(b.skipped for b in batches)) <= set(EXPECTED)
    counts, _ = join_parts([crawl[1], tmp_path / "prepared"], tmp_path / "joined.yaml")
    assert sorted(counts.values()) == [8, 16]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_resume_in_the_middle_of_an_indexed_shard(crawl, tokenizer_dir, packing):  # noqa: F811
    def loader(state=None):
        return _loader(crawl[1], tokenizer_dir, num_workers=1, shuffle=0, packing=packing, buffer=3, state=state)

    first = loader()
    it = iter(first)
    read = [next(it) for _ in range(2)]
    state = first.save_state_rank()
    expected = [next(it) for _ in range(5)]
    last = read[-1].keys[-1].rsplit("/", 1)
    after = [k.rsplit("/", 1) for b in expected for k in b.keys]
    assert any(shard == last[0] and key > last[1] for shard, key in after), "the save lies inside a shard"
    resumed = iter(loader(state))
    got = [next(resumed) for _ in range(5)]
    assert [b.keys for b in got] == [b.keys for b in expected]
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(got, expected))
    assert [b.skipped for b in got] == [b.skipped for b in expected]


def test_json_captions_recipe_measures_and_stats(tmp_path, tokenizer_dir):  # noqa: F811
    shards = [
        [{"jpg": photo(i), "json": json.dumps({"caption": f"a photo {i}", "key": str(i)}).encode()} for i in range(6)]
    ]
    src = write_shards(tmp_path / "json-crawl", shards)
    rules = TrainerRules.from_recipe(RECIPE, [f"data.tokenizer={tokenizer_dir}"])
    report = index(src, rules=rules, check=4, progress=False, workers=1)  # caption found in the .json
    assert report.caption == "json:caption" and report.checked == 4 and not report.skipped
    assert report.token_statistics["samples"] == 4 and report.token_statistics["tiles"] >= 4
    stats = token_statistics(src)
    assert stats is not None and stats.mean_tiles_per_sample >= 1
    assert yaml.safe_load((src / ".nv-meta/dataset.yaml").read_text())["part_filter"][-1] == "json"


def test_picks_spread_over_every_record():
    picks = _picks([3, 0, 5, 4], 6, seed=1)
    flat = [(s, i) for s, ii in picks.items() for i in ii]
    assert len(set(flat)) == 6 and 1 not in picks
    assert all(0 <= i < [3, 0, 5, 4][s] for s, i in flat)
    assert _picks([3, 0, 2], None, 0) == {0: [0, 1, 2], 2: [0, 1]} == _picks([3, 0, 2], 50, 0)


def test_unusable_sources_are_refused(crawl, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexingError, match="no .tar shards"):
        index(tmp_path / "empty", progress=False)
    one = write_shards(tmp_path / "one", [[good(0), good(1)]])
    with pytest.raises(IndexingError, match="cannot give both the train and the val split"):
        index(one, valid_fraction=0.1, progress=False)
    with pytest.raises(IndexingError, match="--caption"):
        index(one, caption="json", progress=False)
    with pytest.raises(IndexingError, match="--check"):
        index(one, check="0", progress=False)
    nocap = write_shards(tmp_path / "nocap", [[{"jpg": photo(0), "json": b'{"url": "x"}'}]])
    with pytest.raises(IndexingError, match="found no caption"):
        index(nocap, progress=False)
    assert not (one / ".nv-meta").exists() and not (nocap / ".nv-meta").exists()
