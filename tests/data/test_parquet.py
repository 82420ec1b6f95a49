"""sail-data prepare from parquet: rows carrying their images (Hugging Face image structs or a binary column, one
or several per row) with LLaVA- or OpenAI-style conversations or captions; bad rows reported by reason; the file
read row group by row group."""

import json
import sys
import tarfile

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest

from sail_megatron.data.blend import join_parts  # noqa: E402
from sail_megatron.data.cli import main as sail_data  # noqa: E402
from sail_megatron.data.parquet_input import BATCH_ROWS, ParquetColumns, ParquetRecords, open_parquet  # noqa: E402
from sail_megatron.data.prepare import prepare  # noqa: E402
from tests.data.img2dataset_inputs import photo  # noqa: E402


def _llava(question="<image>\nWhat is this?", answer="A photograph."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _shard_entries(folder):
    """{sample's json: [image bytes]} of every written sample."""
    out = []
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                images = [members[n] for n in sorted(members) if n.startswith(key + ".img")]
                out.append((json.loads(data), images))
    return out


def test_hf_image_structs_with_conversations_and_bad_rows(tmp_path):
    struct = lambda data, name="x.jpg": {"bytes": data, "path": name}  # noqa: E731
    rows = [
        ("ok", [struct(photo(0))], _llava()),
        ("two", [struct(photo(1, "PNG"), "a.png"), struct(photo(2))], _llava("<image> or <image>?", "The first.")),
        ("text_only", [], _llava("Hello?", "Hi.")),
        ("png", [struct(photo(3, "PNG"), "mislabelled.jpg")], _llava()),
        ("not_an_image", [struct(b"<html>gone</html>")], _llava()),
        ("not_embedded", [{"bytes": None, "path": "/data/coco/1.jpg"}], _llava()),
        ("mismatch", [struct(photo(0))], _llava("<image> and <image>?")),
        ("no_answer", [struct(photo(0))], [{"from": "human", "value": "<image>\nWhat?"}]),
    ]
    table = pa.table(
        {"id": [r[0] for r in rows], "images": [r[1] for r in rows], "conversations": [r[2] for r in rows]}
    )
    src = tmp_path / "sft.parquet"
    pq.write_table(table, src, row_group_size=3)
    report = prepare(src, None, tmp_path / "out", shard_size=2, progress=False, workers=2)
    assert "images <- images (list of Hugging Face image struct {bytes, path}), conversations <- conversations" in (
        report.summary()
    )
    assert report.by_reason() == {
        "image_not_an_image": 1,
        "image_not_embedded": 1,
        "placeholder_mismatch": 1,
        "malformed_line": 1,
    }
    assert {s.id for s in report.skipped} == {"not_an_image", "not_embedded", "mismatch", "no_answer"}
    assert {s.source for s in report.skipped} >= {"sft.parquet:row 4", "sft.parquet:row 5"}
    written = {meta["id"]: (meta, images) for meta, images in _shard_entries(tmp_path / "out")}
    assert set(written) == {"ok", "two", "text_only", "png"}
    assert written["two"][1] == [photo(1, "PNG"), photo(2)]
    assert [i["format"] for i in written["two"][0]["images"]] == ["png", "jpg"]
    assert written["png"][0]["images"][0]["format"] == "png"  # its bytes say so, whatever its name
    saved = json.loads((tmp_path / "out/prepare_report.json").read_text())
    assert saved["input_columns"]["conversations"] == "conversations" and saved["input_columns"]["format"] == "llava"


def test_binary_column_captions_and_openai_messages_by_flags(tmp_path, capsys):
    captions = pa.table(
        {
            "jpg": [photo(0), photo(1), b"", photo(2)],
            "alt": ["a photograph", "a cat", "empty image", "   "],
            "key": [10, 11, 12, 13],
        }
    )
    pq.write_table(captions, tmp_path / "cap.parquet")
    args = ["prepare", "--input", str(tmp_path / "cap.parquet"), "--out", str(tmp_path / "cap"), "--format", "caption"]
    assert sail_data(args + ["--image-column", "jpg", "--caption-column", "alt", "--id-column", "key"]) == 0
    out = capsys.readouterr().out
    assert "format caption: images <- jpg (binary), caption <- alt, id <- key" in out
    assert "skipped 2" in out and "image_empty" in out and "malformed_line" in out
    assert sorted(m["turns"][0]["text"] for m, _ in _shard_entries(tmp_path / "cap")) == ["a cat", "a photograph"]

    messages = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
         {"role": "assistant", "content": "A rocket."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}],
        [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "?"}],
    ]  # fmt: skip
    table = pa.table({"picture": [[photo(3)], None, [photo(0)]], "dialog_json": [json.dumps(m) for m in messages]})
    pq.write_table(table, tmp_path / "chat.parquet")
    report = prepare(
        tmp_path / "chat.parquet",
        None,
        tmp_path / "chat",
        columns=ParquetColumns(image="picture", text="dialog_json"),
        progress=False,
    )
    assert report.written == 2 and report.by_reason() == {"malformed_line": 1}
    metas = sorted((m for m, _ in _shard_entries(tmp_path / "chat")), key=lambda m: len(m["turns"]))
    assert metas[0]["turns"][0] == {"role": "user", "text": "<image>\nWhat is this?"}
    assert [t["role"] for t in metas[1]["turns"]] == ["system", "user", "assistant"]
    assert metas[1]["num_images"] == 0
    counts, _ = join_parts([tmp_path / "cap", tmp_path / "chat"], tmp_path / "both.yaml")  # two files, one blend
    assert sorted(counts.values()) == [2, 2]


def test_columns_are_detected_or_refused(tmp_path):
    pq.write_table(pa.table({"image": [photo(0)], "caption": ["c"]}), tmp_path / "a.parquet")
    cols, line = open_parquet(tmp_path / "a.parquet", ParquetColumns(), None)
    assert (cols.image, cols.caption, cols.fmt) == ("image", "caption", "caption") and "1 rows in 1 row groups" in line
    pq.write_table(pa.table({"pixels": [b"x"], "caption": ["c"]}), tmp_path / "b.parquet")
    assert open_parquet(tmp_path / "b.parquet", ParquetColumns(), None)[0].image == "pixels"  # by its type
    pq.write_table(pa.table({"url": ["http://x"], "caption": ["c"]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="no column of image bytes.*--image-column"):
        open_parquet(tmp_path / "c.parquet", ParquetColumns(), None)
    with pytest.raises(ValueError, match="'nope' is not a column"):
        open_parquet(tmp_path / "a.parquet", ParquetColumns(image="nope"), None)
    with pytest.raises(ValueError, match="found no text column"):
        open_parquet(tmp_path / "a.parquet", ParquetColumns(), "llava")
    assert sail_data(["prepare", "--input", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "o")]) == 2


def test_rows_are_read_one_row_group_at_a_time(tmp_path):
    """Arrow memory and Python rows held at once stay those of one row group, not the file's."""
    import os

    groups, per_group, image_bytes = 16, 8, 96 << 10
    images = [os.urandom(image_bytes) for _ in range(groups * per_group)]  # incompressible: sizes are real
    table = pa.table({"image": images, "caption": [f"c{i}" for i in range(len(images))]})
    path = tmp_path / "big.parquet"
    pq.write_table(table, path, row_group_size=per_group, compression="none")
    del table, images
    cols, _ = open_parquet(path, ParquetColumns(), None)
    records = ParquetRecords(path, cols)
    base, peak, n = pa.total_allocated_bytes(), 0, 0
    for rec in records:
        peak = max(peak, pa.total_allocated_bytes() - base)
        n += 1
    group = per_group * image_bytes
    assert n == groups * per_group and records.row_groups_read == groups
    assert records.rows_held_max <= min(BATCH_ROWS, per_group)
    assert peak < 3 * group < groups * group / 4, (peak, group)
    part = ParquetRecords(path, cols, num_shards=5, shard_index=3)  # every 5th row from row 3
    assert [r.index for r in part] == list(range(3, groups * per_group, 5))


def test_missing_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    pq.write_table(pa.table({"image": [photo(0)], "caption": ["c"]}), tmp_path / "a.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"pip install pyarrow==\d"):
        prepare(tmp_path / "a.parquet", None, tmp_path / "out", progress=False)
