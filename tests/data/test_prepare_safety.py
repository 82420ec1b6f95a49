"""sail-data prepare/demo never delete inputs, never leave half-written output, and fail on bad
arguments, paths, input files and full disks with a short message and exit code 2."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sail_megatron.data import prepare as prepare_module
from sail_megatron.data.cli import build_demo
from sail_megatron.data.cli import main as sail_data
from sail_megatron.data.prepare import PrepareError, _ShardWriter, prepare, run_energon_prepare
from sail_megatron.data.records import read_records
from tests.data.prepare_inputs import big_bmp, image_folder, llava, tree, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _run(capsys, *args: str):
    """(exit code, stderr without the progress bar)."""
    rc = sail_data(["prepare", *args])
    err = capsys.readouterr().err
    return rc, "\n".join(
        line for line in err.splitlines() if line.strip() and "\r" not in line and not line.startswith("prepare: ")
    )


def _no_leftovers(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    if out.parent.exists():
        stray = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not stray, f"staging folders left behind: {stray}"


@pytest.fixture
def dataset(tmp_path):
    """victim/ holding images/ and train.json, like the user's only copy of a dataset."""
    root = tmp_path / "victim"
    images = image_folder(root, ["a.jpg", "b.jpg"])
    src = write_jsonl(root / "train.jsonl", [llava("1", "a.jpg"), llava("2", "b.jpg")])
    return root, images, src


# --- overlapping paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("out_of", ["images", "root", "inside_images"])
def test_out_overlapping_the_inputs_is_refused_and_nothing_is_deleted(dataset, capsys, out_of):
    root, images, src = dataset
    before = tree(root)
    out = {"images": images, "root": root, "inside_images": images / "shards"}[out_of]
    rc, err = _run(capsys, "--input", str(src), "--images", str(images), "--out", str(out), "--overwrite")
    assert rc == 2
    assert "choose an --out" in err and len(err.strip().splitlines()) <= 2
    assert tree(root) == before
    assert not (images / "shards").exists()


def test_out_holding_the_input_file_is_refused(tmp_path, capsys):
    images = image_folder(tmp_path / "pics")
    src = write_jsonl(tmp_path / "data" / "train.jsonl", [llava("1", "good.jpg")])
    rc, err = _run(capsys, "--input", str(src), "--images", str(images), "--out", str(tmp_path / "data"), "--overwrite")
    assert rc == 2 and "contains the input file" in err
    assert src.is_file()


def test_overlap_is_seen_through_symlinks(dataset, tmp_path, capsys):
    root, images, src = dataset
    before = tree(root)
    link = tmp_path / "link_to_images"
    link.symlink_to(images)
    rc, err = _run(capsys, "--input", str(src), "--images", str(images), "--out", str(link), "--overwrite")
    assert rc == 2 and "input folder" in err
    assert tree(root) == before


def test_out_next_to_the_input_file_is_fine(dataset):
    root, images, src = dataset
    report = prepare(src, images, root / "shards", progress=False)
    assert report.written == 2 and (root / "shards" / ".nv-meta" / "dataset.yaml").is_file()


def test_overwrite_refuses_a_folder_that_is_not_a_prepare_output(dataset, tmp_path, capsys):
    root, images, src = dataset
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my only copy")
    rc, err = _run(capsys, "--input", str(src), "--images", str(images), "--out", str(out), "--overwrite")
    assert rc == 2 and "is not a sail-data prepare output" in err
    assert (out / "notes.txt").read_text() == "my only copy"
    # A prepare output with a foreign file added is no longer ours to delete either.
    out2 = tmp_path / "prepared"
    prepare(src, images, out2, progress=False)
    (out2 / "extra.tar.gz").write_bytes(b"x")
    rc, _ = _run(capsys, "--input", str(src), "--images", str(images), "--out", str(out2), "--overwrite")
    assert rc == 2 and (out2 / "extra.tar.gz").exists()


def test_overwrite_replaces_an_earlier_output_only_after_success(dataset, tmp_path, capsys):
    root, images, src = dataset
    out = tmp_path / "out"
    prepare(src, images, out, progress=False)
    old = tree(out)
    bad = write_jsonl(tmp_path / "bad.jsonl", [llava("x", "missing.jpg")])
    rc, err = _run(capsys, "--input", str(bad), "--images", str(images), "--out", str(out), "--overwrite")
    assert rc == 2 and "no valid records" in err and "missing_image" in err
    assert tree(out) == old, "a failed run leaves the earlier output untouched"
    more = write_jsonl(tmp_path / "more.jsonl", [llava(str(i), "a.jpg") for i in range(3)])
    rc, _ = _run(capsys, "--input", str(more), "--images", str(images), "--out", str(out), "--overwrite")
    assert rc == 0
    assert json.loads((out / "prepare_report.json").read_text())["written"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_demo_overwrite_refuses_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "data"
    (out / "images").mkdir(parents=True)
    (out / "images" / "cat.jpg").write_bytes(b"precious")
    assert sail_data(["demo", "--out", str(out), "--overwrite"]) == 2
    assert "is not a sail-data demo folder" in capsys.readouterr().err
    assert (out / "images" / "cat.jpg").read_bytes() == b"precious"


def test_demo_builds_staged_and_overwrites_its_own_output(tmp_path):
    out = build_demo(tmp_path / "demo")
    assert (out / "blend.yaml").is_file() and (out / "sft" / ".nv-meta" / "dataset.yaml").is_file()
    build_demo(out, overwrite=True)  # an earlier demo, recognised by its layout
    assert (out / "captions" / ".nv-meta" / "dataset.yaml").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


# --- failed runs leave nothing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["empty_input", "missing_input", "max_pixels_0", "workers_0", "bad_split", "all_invalid"]
)
def test_failed_runs_leave_no_out_folder(tmp_path, capsys, case):
    images = image_folder(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [llava("1", "good.jpg")])
    extra = []
    if case == "empty_input":
        src.write_text("\n  \n")
    elif case == "missing_input":
        src = tmp_path / "nope.jsonl"
    elif case == "max_pixels_0":
        extra = ["--max-pixels", "0"]
    elif case == "workers_0":
        extra = ["--workers", "0"]
    elif case == "bad_split":
        extra = ["--split-ratio", "banana"]
    else:
        write_jsonl(src, [llava("1", "nope.jpg"), {"id": "2"}])
    out = tmp_path / "deep" / "out"
    rc, err = _run(capsys, "--input", str(src), "--images", str(images), "--out", str(out), *extra)
    assert rc == 2, err
    assert err.startswith("sail-data: error: ") and "Traceback" not in err and len(err.splitlines()) <= 5
    _no_leftovers(out)
    assert not (tmp_path / "deep").exists(), "parents created for the run are removed again"


def test_non_image_field_types_are_malformed_lines(tmp_path):
    images = image_folder(tmp_path)
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            llava("int", 5),
            llava("dict", {"path": "good.jpg"}),
            llava("zero", 0),
            llava("list_int", [1]),
            llava("ok", "good.jpg"),
        ],
    )
    report = prepare(src, images, tmp_path / "out", progress=False)
    assert report.written == 1
    assert report.by_reason() == {"malformed_line": 4}
    assert "'image' must be a path or a list of paths, got int" in report.skipped[0].detail


# --- split ratio and energon -----------------------------------------------------------------------


@pytest.mark.parametrize("ratio", ["banana", "1,1", "0,1,0", "-1,1,1", "nan,0,0", "1,inf,0", "1,0,0,0", ""])
def test_invalid_split_ratio_is_refused_before_writing(tmp_path, capsys, ratio):
    images = image_folder(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [llava("1", "good.jpg")])
    rc, err = _run(
        capsys, "--input", str(src), "--images", str(images), "--out", str(tmp_path / "out"), f"--split-ratio={ratio}"
    )
    assert rc == 2 and "--split-ratio" in err and "positive train share" in err
    _no_leftovers(tmp_path / "out")


def test_a_train_split_without_shards_is_refused(tmp_path, capsys):
    images = image_folder(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [llava(str(i), "good.jpg") for i in range(3)])
    rc, err = _run(
        capsys, "--input", str(src), "--images", str(images), "--out", str(tmp_path / "out"), "--split-ratio", "1,2,0"
    )  # one shard: int(1 * 1/3) = 0 train shards
    assert rc == 2 and "leaves the train split no shard" in err
    _no_leftovers(tmp_path / "out")


def test_energon_prepare_without_dataset_yaml_is_an_error(tmp_path):
    writer = _ShardWriter(tmp_path, shard_size=2)
    writer.write({"kind": "caption", "turns": [{"role": "caption", "text": "hi"}], "num_images": 0}, [])
    writer.close()
    with pytest.raises(PrepareError, match="no .nv-meta/dataset.yaml"):
        run_energon_prepare(tmp_path, "banana")  # energon says "Invalid split" and exits 0


# --- input encodings and shapes --------------------------------------------------------------------


def test_utf8_bom_and_uppercase_suffixes_keep_every_record(tmp_path):
    records = [llava("é1", "good.jpg"), llava("2", "good.jpg")]
    cases = {
        "bom.jsonl": write_jsonl(tmp_path / "bom.jsonl", records, bom=True),
        "upper.JSONL": write_jsonl(tmp_path / "upper.JSONL", records),
    }
    for name, text in (("bom.json", json.dumps(records)), ("upper.JSON", json.dumps(records, indent=2))):
        path = tmp_path / name
        path.write_bytes((b"\xef\xbb\xbf" if "bom" in name else b"") + text.encode())
        cases[name] = path
    for name, path in cases.items():
        assert [r.value for r in read_records(path)] == records, name
    report = prepare(cases["bom.jsonl"], image_folder(tmp_path), tmp_path / "out", progress=False)
    assert (report.written, len(report.skipped)) == (2, 0)


@pytest.mark.parametrize("encoding,expect", [("latin-1", "line 2 is not UTF-8"), ("utf-16", "is UTF-16")])
def test_non_utf8_input_names_file_and_line(tmp_path, capsys, encoding, expect):
    images = image_folder(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [llava("1", "good.jpg"), llava("café", "good.jpg")], encoding=encoding)
    rc, err = _run(capsys, "--input", str(src), "--images", str(images), "--out", str(tmp_path / "out"))
    assert rc == 2 and str(src) in err and expect in err and "iconv" in err
    _no_leftovers(tmp_path / "out")


def test_whole_document_inputs_say_what_the_top_level_must_be(tmp_path, capsys):
    images = image_folder(tmp_path)
    records = [llava("1", "good.jpg"), llava("2", "good.jpg")]
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text(json.dumps(records, indent=2))
    rc, err = _run(capsys, "--input", str(pretty), "--images", str(images), "--out", str(tmp_path / "o1"))
    assert rc == 2 and "one JSON array spread over several lines" in err and "pretty.json" in err
    wrapped = tmp_path / "obj.json"
    wrapped.write_text(json.dumps({"data": records}, indent=2))
    rc, err = _run(capsys, "--input", str(wrapped), "--images", str(images), "--out", str(tmp_path / "o2"))
    assert rc == 2 and "top level must be a JSON array" in err and "'data'" in err
    one_line = tmp_path / "obj.jsonl"
    one_line.write_text(json.dumps({"data": records}) + "\n")
    rc, err = _run(capsys, "--input", str(one_line), "--images", str(images), "--out", str(tmp_path / "o3"))
    assert rc == 2 and "no valid records" in err and "keys: data" in err


# --- samples the trainer would always reject, and paths outside --images ---------------------------


def test_placeholder_in_answer_is_skipped(tmp_path):
    images = image_folder(tmp_path)
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [llava("answer", "good.jpg", text="What is this?", answer="It is <image>."), llava("ok", "good.jpg")],
    )
    report = prepare(src, images, tmp_path / "out", progress=False)
    assert report.written == 1
    assert [(s.id, s.reason) for s in report.skipped] == [("answer", "malformed_sample")]
    assert "assistant turn contains an image placeholder" in report.skipped[0].detail


def test_recipe_budget_skips_what_training_would_skip(tmp_path, capsys):
    from sail_megatron.data.tokenizer import build_demo_tokenizer

    images = image_folder(tmp_path)
    tok = build_demo_tokenizer(["what is this picture", "a picture"] * 10, tmp_path / "tok", vocab_size=300)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_preset: tiny\ndata: {{tokenizer: {tok}, seq_length: 128, max_tiles: 1}}\n")
    many = ["good.jpg"] * 40
    src = write_jsonl(
        tmp_path / "in.jsonl", [llava("many", many, text="<image>" * 40 + " Which?"), llava("one", "good.jpg")]
    )
    rc = sail_data(
        [
            "prepare",
            "--input",
            str(src),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "out"),
            "--recipe",
            str(recipe),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "wrote 1 samples" in out and "too_long" in out and "image blocks need" in out
    # Without the recipe the budget is unknown, so the sample is kept.
    assert prepare(src, images, tmp_path / "out2", progress=False).written == 2
    assert (
        sail_data(
            [
                "prepare",
                "--input",
                str(src),
                "--images",
                str(images),
                "--out",
                str(tmp_path / "o3"),
                "--recipe",
                str(tmp_path / "none.yaml"),
            ]
        )
        == 2
    )


def test_paths_outside_images_need_a_flag(tmp_path):
    images = image_folder(tmp_path / "in")
    outside = image_folder(tmp_path / "elsewhere", ["x.jpg"]) / "x.jpg"
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            llava("up", "../../elsewhere/images/x.jpg"),
            llava("abs", str(outside)),
            llava("ok", "good.jpg"),
            llava("inner", "./good.jpg"),
        ],
    )
    report = prepare(src, images, tmp_path / "out", progress=False)
    assert report.written == 2
    assert sorted((s.id, s.reason) for s in report.skipped) == [("abs", "outside_images"), ("up", "outside_images")]
    assert "--allow-outside-images" in report.skipped[0].detail
    assert prepare(src, images, tmp_path / "out2", progress=False, allow_outside_images=True).written == 4


# --- unwritable output and a full disk -------------------------------------------------------------


def test_out_blocked_by_a_file(tmp_path, capsys):
    images = image_folder(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [llava("1", "good.jpg")])
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, expect in ((afile, "exists and is not a folder"), (afile / "ds", "is a file, not a folder")):
        for extra in ([], ["--overwrite"]):
            rc, err = _run(capsys, "--input", str(src), "--images", str(images), "--out", str(out), *extra)
            assert rc == 2 and expect in err and str(afile) in err and len(err.strip().splitlines()) <= 2
    assert afile.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_under_an_unwritable_folder(tmp_path, capsys):
    images = image_folder(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [llava("1", "good.jpg")])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    rc, err = _run(capsys, "--input", str(src), "--images", str(images), "--out", str(locked / "ds"))
    assert rc == 2 and "no permission to write in" in err


def test_disk_full_while_writing_a_shard(tmp_path, capsys, monkeypatch):
    images = image_folder(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [llava(str(i), "good.jpg") for i in range(6)])
    written = []

    def add(self, name, data):
        if len(written) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(name)

    monkeypatch.setattr(prepare_module._ShardWriter, "_add", add)
    out = tmp_path / "out"
    rc, err = _run(capsys, "--input", str(src), "--images", str(images), "--out", str(out), "--shard-size", "2")
    assert rc == 2
    assert err.strip() == (
        f"sail-data: error: cannot write {out}/shard-000001.tar: No space left on device; "
        "free space there or choose another --out"
    )
    _no_leftovers(out)


def test_file_size_limit_while_writing_is_reported_not_raised(tmp_path):
    """A real failing write (RLIMIT_FSIZE makes the kernel refuse it) through the real CLI process."""
    images = image_folder(tmp_path)
    big_bmp(images / "big.bmp")
    src = write_jsonl(tmp_path / "in.jsonl", [llava(str(i), "big.bmp") for i in range(4)])
    out = tmp_path / "out"
    script = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
        "from sail_megatron.data.cli import main; "
        f"sys.exit(main(['prepare', '--input', {str(src)!r}, '--images', {str(images)!r}, "
        f"'--out', {str(out)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot write {out}/shard-000000.tar: File too large" in result.stderr
    _no_leftovers(out)
