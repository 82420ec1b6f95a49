"""sail-data prepare: every record written or reported with its reason."""

import json
import tarfile

import pytest

from sail_megatron.data.cli import main as sail_data
from sail_megatron.data.prepare import prepare
from tests.data import bad_inputs


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for name, (data, ext, _) in bad_inputs.cases().items():
        (d / f"{name}.{ext}").write_bytes(data)
    return d


def _llava(rid, images, text="<image>\nWhat is this?"):
    rec = {"id": rid, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "A picture."}]}
    if images is not None:
        rec["image"] = images
    return json.dumps(rec)


def test_llava_bad_inputs_are_reported_by_reason(tmp_path, image_dir):
    lines = [_llava(name, f"{name}.{ext}") for name, (_, ext, _) in bad_inputs.cases().items()]
    lines += [
        _llava("two", ["good.jpg", "good_png.png"], "<image> vs <image>: which?"),
        _llava("text_only", None, "Hello?"),
        _llava("no_placeholder", "good.jpg", "What is this?"),  # converted: placeholder added
        _llava("mismatch", ["good.jpg", "grayscale.jpg"], "<image> only one placeholder"),
        _llava("missing", "does_not_exist.jpg"),
        "{not json",
        json.dumps({"id": "no_turns"}),
    ]
    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(lines) + "\n")
    report = prepare(src, image_dir, tmp_path / "out", fmt="llava", shard_size=4, verify_decode=True, progress=False)
    expected = {reason for _, _, reason in bad_inputs.cases().values() if reason}
    assert report.by_reason() == {
        **{r: 1 for r in expected},
        "placeholder_mismatch": 1,
        "missing_image": 1,
        "malformed_line": 2,
    }
    valid = [n for n, (_, _, r) in bad_inputs.cases().items() if r is None]
    assert report.written == len(valid) + 3
    assert report.converted == {"added_image_placeholders": 1}
    saved = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert saved["written"] == report.written and len(saved["skipped"]) == len(report.skipped)
    assert {s["source"] for s in saved["skipped"]} >= {"data.jsonl:18", "data.jsonl:19"}  # bad JSON, no turns
    # Shards hold exactly the written samples, images stored with their sizes (EXIF applied).
    members = []
    for shard in sorted((tmp_path / "out").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    metas = [json.loads(data) for name, data in members if name.endswith(".json")]
    assert len(metas) == report.written
    rotated = next(m for m in metas if m["id"] == "exif_rotated")
    assert rotated["images"] == [{"width": 20, "height": 40, "format": "jpg"}]
    assert (tmp_path / "out" / ".nv-meta" / "dataset.yaml").is_file()


def test_caption_format_and_cli(tmp_path, image_dir, capsys):
    src = tmp_path / "captions.jsonl"
    src.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"image": "good.jpg", "caption": "Noise."},
                {"image": "zero_bytes.jpg", "caption": "Nothing."},
                {"image": "good_png.png"},
            ]
        )
        + "\n"
    )
    rc = sail_data(
        [
            "prepare",
            "--input",
            str(src),
            "--images",
            str(image_dir),
            "--out",
            str(tmp_path / "o"),
            "--format",
            "caption",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "wrote 1 samples in 1 shards; skipped 2" in out
    assert "captions.jsonl:2" in out and "image_empty" in out and "malformed_line" in out
    # Refuses to overwrite silently.
    assert (
        sail_data(
            [
                "prepare",
                "--input",
                str(src),
                "--images",
                str(image_dir),
                "--out",
                str(tmp_path / "o"),
                "--format",
                "caption",
            ]
        )
        == 2
    )


def test_deterministic_shards(tmp_path, image_dir):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(_llava(str(i), "good.jpg") for i in range(5)) + "\n")
    a = prepare(src, image_dir, tmp_path / "a", shard_size=2, progress=False)
    b = prepare(src, image_dir, tmp_path / "b", shard_size=2, progress=False)
    assert a.shards == b.shards == 3
    for shard in sorted((tmp_path / "a").glob("shard-*.tar")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def test_valid_fraction_holds_whole_shards_out(tmp_path, image_dir, capsys):
    from sail_megatron.data.blend import split_samples

    src = tmp_path / "captions.jsonl"
    src.write_text("".join(json.dumps({"image": "good.jpg", "caption": f"Noise {i}."}) + "\n" for i in range(10)))
    args = ["prepare", "--input", str(src), "--images", str(image_dir), "--format", "caption", "--shard-size", "3"]
    assert sail_data([*args, "--out", str(tmp_path / "o"), "--valid-fraction", "0.25"]) == 0
    # 4 shards (3, 3, 3, 1 samples): energon gives the train split int(4 x 0.75) = 3 of them.
    assert (split_samples(tmp_path / "o", "train"), split_samples(tmp_path / "o", "val")) == (9, 1)
    assert sail_data([*args, "--out", str(tmp_path / "p"), "--valid-fraction", "1.5"]) == 2
    assert sail_data([*args, "--out", str(tmp_path / "q"), "--valid-fraction", "0.1", "--split-ratio", "8,1,1"]) == 2
    err = capsys.readouterr().err
    assert "between 0 and 1" in err and "not both" in err
