"""sail-data prepare at scale: bounded read-ahead (memory flat in the input's size), deterministic input
shards prepared separately, and their join into one blend the loader reads."""

import json
import tarfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sail_megatron.config.data import DataConfig
from sail_megatron.data import prepare as prepare_module
from sail_megatron.data.blend import join_parts
from sail_megatron.data.cli import main as sail_data
from sail_megatron.data.loader import build_train_loader
from sail_megatron.data.prepare import bounded_map, prepare
from sail_megatron.data.records import read_records
from sail_megatron.data.tokenizer import build_demo_tokenizer, load_tokenizer
from tests.data.prepare_inputs import image_folder, llava, write_jsonl


def _shard_ids(folder: Path) -> list:
    ids = []
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            ids += [json.loads(tar.extractfile(m).read())["id"] for m in tar.getmembers() if m.name.endswith(".json")]
    return ids


# --- bounded read-ahead ----------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 3, 8])
def test_bounded_map_keeps_order_and_at_most_window_results_alive(window):
    alive, peak, lock = 0, 0, threading.Lock()

    def work(i):
        nonlocal alive, peak
        with lock:
            alive += 1
            peak = max(peak, alive)
        time.sleep(0.001 * (i % 3))  # finish out of order
        return i

    out = []
    with ThreadPoolExecutor(4) as pool:
        for i in bounded_map(pool, work, range(200), window):
            out.append(i)
            with lock:
                alive -= 1
    assert out == list(range(200))
    assert peak <= window


def _max_read_ahead(tmp_path: Path, n: int, workers: int, monkeypatch) -> int:
    """Most images read but not yet written at any moment of a prepare over n records."""
    images = image_folder(tmp_path / f"in{n}")
    src = write_jsonl(tmp_path / f"in{n}.jsonl", [llava(str(i), "good.jpg") for i in range(n)])
    reads, written, peak, lock = 0, 0, 0, threading.Lock()

    def read_file(path):
        nonlocal reads, peak
        with lock:
            reads += 1
            peak = max(peak, reads - written)
        return path.read_bytes()

    real_write = prepare_module._ShardWriter.write

    def write(self, meta, images):
        nonlocal written
        real_write(self, meta, images)
        with lock:
            written += 1

    monkeypatch.setattr(prepare_module._ShardWriter, "write", write)
    report = prepare(
        src, images, tmp_path / f"out{n}", workers=workers, shard_size=1000, progress=False, read_file=read_file
    )
    assert report.written == n
    assert _shard_ids(tmp_path / f"out{n}") == [str(i) for i in range(n)], "input order, whatever the timing"
    return peak


def test_read_ahead_does_not_grow_with_the_input(tmp_path, monkeypatch):
    workers = 2
    small = _max_read_ahead(tmp_path, 40, workers, monkeypatch)
    large = _max_read_ahead(tmp_path, 400, workers, monkeypatch)
    window = 4 * workers
    assert small <= window + 1 and large <= window + 1, (small, large)


# --- input shards ----------------------------------------------------------------------------------


def test_read_records_shards_partition_the_input(tmp_path):
    lines = [json.dumps({"id": i}) for i in range(10)]
    lines.insert(3, "")  # blank lines are not records
    lines.insert(6, "{broken")
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    everything = [r.source for r in read_records(src)]
    parts = [[r for r in read_records(src, 3, k)] for k in range(3)]
    assert sorted(r.source for p in parts for r in p) == sorted(everything)
    assert all(r.index % 3 == k for k, p in enumerate(parts) for r in p)
    with pytest.raises(ValueError, match="--shard-index must be in 0..2"):
        list(read_records(src, 3, 3))


def test_two_shards_hold_every_record_once_and_join_into_a_loadable_blend(tmp_path, capsys):
    images = image_folder(tmp_path)
    records = [llava(f"r{i}", "good.jpg") for i in range(9)] + [llava("bad", "missing.jpg")]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    parts = []
    for k in range(2):
        out = tmp_path / "parts" / f"part{k}"
        rc = sail_data(
            [
                "prepare",
                "--input",
                str(src),
                "--images",
                str(images),
                "--out",
                str(out),
                "--num-shards",
                "2",
                "--shard-index",
                str(k),
                "--shard-size",
                "2",
            ]
        )
        assert rc == 0
        parts.append(out)
    ids = [_shard_ids(p) for p in parts]
    assert sorted(ids[0] + ids[1]) == sorted(f"r{i}" for i in range(9)), "every valid record exactly once"
    assert ids[0] == [f"r{i}" for i in range(0, 9, 2)] and ids[1] == [f"r{i}" for i in range(1, 9, 2)]
    skipped = [json.loads((p / "prepare_report.json").read_text())["skipped"] for p in parts]
    assert [s["id"] for s in skipped[0] + skipped[1]] == ["bad"]

    blend = tmp_path / "blend.yaml"
    capsys.readouterr()
    assert sail_data(["join", "--parts", *map(str, parts), "--out", str(blend)]) == 0
    assert "2 parts, 9 train samples" in capsys.readouterr().out
    import yaml

    doc = yaml.safe_load(blend.read_text())
    assert {e["path"]: e["weight"] for e in doc["splits"]["train"]["blend"]} == {"parts/part0": 5.0, "parts/part1": 4.0}

    tok = build_demo_tokenizer(["what is this", "a picture"] * 10, tmp_path / "tok", vocab_size=300)
    cfg = DataConfig(
        path=str(blend),
        tokenizer=str(tok),
        seq_length=128,
        micro_batch_size=1,
        max_tiles=2,
        num_workers=0,
        shuffle_buffer_size=0,
        packing=False,
    )
    it = iter(build_train_loader(cfg, load_tokenizer(tok), 56, 4))
    sources = Counter(next(it).keys[0].split("/")[0] for _ in range(40))
    assert set(sources) == {"part0", "part1"}, sources


def test_join_refuses_bad_part_lists(tmp_path, capsys):
    images = image_folder(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [llava(f"r{i}", "good.jpg") for i in range(4)])
    part = tmp_path / "p0"
    prepare(src, images, part, num_shards=2, shard_index=0, progress=False)
    with pytest.raises(ValueError, match="listed twice"):
        join_parts([part, tmp_path / "." / "p0"], tmp_path / "b.yaml")
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        join_parts([part, images], tmp_path / "b.yaml")
    with pytest.raises(ValueError, match=r"shards \[1\] are missing.*--allow-missing-parts"):
        join_parts([part], tmp_path / "b.yaml")
    counts, warnings = join_parts([part], tmp_path / "b.yaml", allow_missing_parts=True)
    assert counts == {"p0": 2} and warnings == ["the parts hold input shards [0] of 2; missing [1]"]
    out = ["--out", str(tmp_path / "b.yaml")]
    assert sail_data(["join", "--parts", str(part), *out, "--allow-missing-parts"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    copy = tmp_path / "copy"
    prepare(src, images, copy, num_shards=2, shard_index=0, progress=False)
    with pytest.raises(ValueError, match="both hold input shard 0 of 2"):
        join_parts([part, copy], tmp_path / "c.yaml")


def test_shard_flags_are_checked_first(tmp_path, capsys):
    images = image_folder(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [llava("1", "good.jpg")])
    for flags in (
        ["--num-shards", "0"],
        ["--num-shards", "2", "--shard-index", "2"],
        ["--num-shards", "2", "--shard-index=-1"],
    ):
        assert (
            sail_data(["prepare", "--input", str(src), "--images", str(images), "--out", str(tmp_path / "o"), *flags])
            == 2
        )
        assert "--num-shards" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
