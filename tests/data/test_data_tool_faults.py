"""`sail-data` never waits on input forever, stops promptly on a signal and skips bad records by reason.

Each test runs the real command line in a subprocess with a timeout, so a regression that blocks fails instead
of hanging the suite.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from sail_megatron.data.cli import main as sail_data
from tests.data.prepare_inputs import image_folder, llava, write_jsonl
from tests.data.test_image_io import encode, noise

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "sail_megatron.data.cli"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real `sail-data` in a subprocess; a command that blocks fails the test with TimeoutExpired."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=ENV)


def _caught_signals(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M).group(1), 16)


def _start_and_wait_for_handlers(args, cwd: Path = REPO) -> subprocess.Popen:
    """Start `sail-data` and return once it catches SIGTERM (its stop handlers are installed, imports done)."""
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=ENV)
    deadline = time.monotonic() + 60
    while not _caught_signals(proc.pid) & (1 << (signal.SIGTERM - 1)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"sail-data ended or never installed its handlers: {proc.communicate()}")
        time.sleep(0.01)
    return proc


def _stop(proc: subprocess.Popen, sig: int, command: str) -> str:
    """Send `sig`; the command must end within 3 s with 128 + sig and one line saying it was interrupted."""
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"sail-data {command} ignored {signal.Signals(sig).name} for 10 s")
    took = time.monotonic() - sent
    assert proc.returncode == 128 + sig, err
    assert took < 3, f"{took:.1f} s to stop"
    assert "Traceback" not in err
    assert err.strip(), "no message"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"sail-data {command}: interrupted by {signal.Signals(sig).name}"), err
    return err


def _no_leftovers(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    stray = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not stray, f"left behind: {stray}"


def _report(out: Path) -> dict:
    return json.loads((out / "prepare_report.json").read_text())


# --- only regular files are read, each within a stated size ----------------------------------------


def test_prepare_skips_images_that_are_not_regular_files_by_kind(tmp_path, monkeypatch):
    images = image_folder(tmp_path, ["ok.jpg"])
    os.mkfifo(images / "fifo.jpg")
    (images / "dir.jpg").mkdir()
    monkeypatch.chdir(images)  # a short socket path
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock.jpg")
    names = ["ok.jpg", "fifo.jpg", "dir.jpg", "sock.jpg", "/dev/zero"]
    src = write_jsonl(tmp_path / "in.jsonl", [llava(n, n) for n in names])
    out = tmp_path / "out"
    flags = ["--allow-outside-images", "--workers", "2"]
    try:
        done = run_cli("prepare", "--input", str(src), "--images", str(images), "--out", str(out), *flags)
    finally:
        sock.close()
    assert done.returncode == 0, done.stderr
    report = _report(out)
    assert report["written"] == 1
    assert report["skipped_by_reason"] == {"image_not_a_file": 4}
    detail = {s["id"]: s["detail"] for s in report["skipped"]}
    assert "is a FIFO" in detail["fifo.jpg"] and "is a folder" in detail["dir.jpg"]
    assert "is a socket" in detail["sock.jpg"] and "is a character device" in detail["/dev/zero"]


def test_image_files_over_the_size_limit_are_skipped_unread(tmp_path, capsys):
    images = image_folder(tmp_path, ["ok.jpg"])
    padded = encode(noise(64, 48), "JPEG") + bytes(2_000_000)  # a valid JPEG, then 2 MB of junk
    (images / "padded.jpg").write_bytes(padded)
    src = write_jsonl(tmp_path / "in.jsonl", [llava("ok", "ok.jpg"), llava("padded", "padded.jpg")])
    out = tmp_path / "out"
    args = ["prepare", "--input", str(src), "--images", str(images), "--out", str(out)]
    assert sail_data([*args, "--max-image-bytes", "1000000"]) == 0
    report = _report(out)
    assert report["written"] == 1 and report["skipped_by_reason"] == {"image_file_too_big": 1}
    assert f"holds {len(padded)} bytes, over the limit of 1000000 bytes" in report["skipped"][0]["detail"]
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert sum(m.size for m in tar.getmembers()) < 100_000, "no padded image in the shard"


def _fake_part(folder: Path, report: object = None) -> Path:
    """A folder that passes for a prepared part up to the point where energon would read it."""
    (folder / ".nv-meta").mkdir(parents=True)
    if report is not None:
        (folder / "prepare_report.json").write_text(json.dumps(report))
    return folder


def _within(seconds: float, fn, *args):
    """fn(*args), run in a daemon thread: a call that blocks fails the test instead of hanging the suite."""
    result = {}

    def call():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # handed to the test below
            result["error"] = e

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{fn.__name__} blocked for {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from sail_megatron.data.tokenizer import build_demo_tokenizer

    return build_demo_tokenizer(["what is this"] * 5, tmp_path_factory.mktemp("tok"), vocab_size=300)


def test_show_join_and_the_trainer_refuse_fifos_instead_of_waiting(tmp_path, tokenizer, capsys):
    images = image_folder(tmp_path)
    os.mkfifo(images / "fifo.jpg")
    src = write_jsonl(tmp_path / "in.jsonl", [llava("1", "fifo.jpg")])
    show = ["show", "--input", str(src), "--images", str(images), "--tokenizer", str(tokenizer)]
    assert _within(30, sail_data, show) == 2
    assert "fifo.jpg is a FIFO (named pipe), not a regular file" in capsys.readouterr().err

    part = _fake_part(tmp_path / "part")
    os.mkfifo(part / "prepare_report.json")
    assert _within(30, sail_data, ["join", "--parts", str(part), "--out", str(tmp_path / "blend.yaml")]) == 2
    assert "prepare_report.json is a FIFO" in capsys.readouterr().err
    assert not (tmp_path / "blend.yaml").exists()

    from sail_megatron.config import ConfigError
    from sail_megatron.data.dataset_path import check_dataset_path

    blend = tmp_path / "fifo.yaml"
    os.mkfifo(blend)
    with pytest.raises(ConfigError, match="is a FIFO"):
        _within(30, check_dataset_path, str(blend))


def test_input_and_recipe_that_are_not_regular_files_are_refused(tmp_path, capsys):
    images = image_folder(tmp_path)
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    args = ["prepare", "--images", str(images), "--out", str(tmp_path / "out")]
    assert sail_data([*args, "--input", str(fifo)]) == 2
    assert f"--input {fifo} is a FIFO (named pipe), not a regular file" in capsys.readouterr().err
    assert sail_data([*args, "--input", "/dev/zero"]) == 2
    assert "is a character device" in capsys.readouterr().err
    src = write_jsonl(tmp_path / "ok.jsonl", [llava("1", "good.jpg")])
    assert sail_data([*args, "--input", str(src), "--recipe", str(fifo)]) == 2
    assert "is a FIFO" in capsys.readouterr().err
    _no_leftovers(tmp_path / "out")


# --- a stop signal stops every command at once and leaves nothing -----------------------------------


@pytest.fixture(scope="module")
def busy_input(tmp_path_factory):
    """Enough full decodes of a large image to keep prepare's readers busy for many seconds."""
    root = tmp_path_factory.mktemp("busy")
    images = root / "images"
    images.mkdir()
    (images / "big.jpg").write_bytes(encode(noise(1200, 1200), "JPEG", quality=95))
    src = write_jsonl(root / "in.jsonl", [llava(str(i), "big.jpg") for i in range(400)])
    return root, images, src


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_prepare_while_its_readers_are_busy(busy_input, tmp_path, sig):
    root, images, src = busy_input
    out = tmp_path / "out"
    args = ["prepare", "--input", str(src), "--images", str(images), "--out", str(out), "--verify-decode"]
    proc = _start_and_wait_for_handlers([*args, "--workers", "2"])
    deadline = time.monotonic() + 30
    while not any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir()):  # writing shards now
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(0.3)
    err = _stop(proc, sig, "prepare")
    assert "--out was left as it was" in err
    _no_leftovers(out)


def test_a_stop_signal_stops_show(tmp_path, tokenizer):
    big = tmp_path / "big.jsonl"
    big.write_text("{}\n" * 1_000_000)  # show scans to the last record
    proc = _start_and_wait_for_handlers(
        ["show", "--input", str(big), "--tokenizer", str(tokenizer), "--index", "999999"]
    )
    _stop(proc, signal.SIGINT, "show")


def test_a_stop_signal_stops_join(tmp_path):
    report = tmp_path / "report.json"  # a large report (many skipped records) takes a while to read
    report.write_text(json.dumps({"skipped": [{"id": str(i), "reason": "missing_image"} for i in range(300_000)]}))
    parts = []
    for i in range(40):
        parts.append(_fake_part(tmp_path / f"p{i}"))
        os.link(report, parts[-1] / "prepare_report.json")
    out = tmp_path / "blend.yaml"
    proc = _start_and_wait_for_handlers(["join", "--parts", *map(str, parts), "--out", str(out)])
    _stop(proc, signal.SIGTERM, "join")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".blend.yaml")]


# --- bad records are skipped by reason, never a traceback ---------------------------------------------


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_deep_and_overlong_records_are_skipped_by_reason(tmp_path):
    images = image_folder(tmp_path)
    src = tmp_path / "in.jsonl"
    long = llava("long", "good.jpg", text="<image>\n" + "word " * 220_000)
    lines = [
        json.dumps(llava("ok1", "good.jpg")),
        "[" * 100_000 + "]" * 100_000,  # beyond what the JSON decoder follows
        json.dumps({"id": "deep", "conversations": _nested(150)}),  # parsed, but deeper than records go
        json.dumps(long),
        json.dumps(llava("ok2", "good.jpg")),
    ]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    done = run_cli("prepare", "--input", str(src), "--images", str(images), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    report = _report(out)
    assert report["written"] == 2
    assert report["skipped_by_reason"] == {"record_too_deep": 2, "text_too_long": 1}
    chars = sum(len(turn["value"]) for turn in long["conversations"])
    detail = next(s["detail"] for s in report["skipped"] if s["id"] == "long")
    assert f"{chars} characters of text, more than 1000000 (--max-text-chars)" in detail


def test_recipe_skips_text_its_sequence_can_never_hold_without_tokenizing(tmp_path, capsys, monkeypatch):
    from sail_megatron.data import trainer_rules
    from sail_megatron.data.tokenizer import build_demo_tokenizer

    images = image_folder(tmp_path)
    tok = build_demo_tokenizer(["what is this picture", "a picture"] * 10, tmp_path / "tok", vocab_size=300)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_preset: tiny\ndata: {{tokenizer: {tok}, seq_length: 128, max_tiles: 1}}\n")
    records = [llava("ok", "good.jpg"), llava("long", "good.jpg", text="<image>\n" + "what is this " * 20_000)]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    probed = []
    real = trainer_rules.TrainerRules.assess
    monkeypatch.setattr(trainer_rules.TrainerRules, "assess", lambda self, m, i: probed.append(m) or real(self, m, i))
    args = [
        "prepare",
        "--input",
        str(src),
        "--images",
        str(images),
        "--out",
        str(tmp_path / "o"),
        "--recipe",
        str(recipe),
    ]
    assert sail_data(args) == 0
    out = capsys.readouterr().out
    assert "wrote 1 samples" in out and "text_too_long" in out and "seq_length 128 tokens" in out
    assert len(probed) == 1, "the long record never reached the tokenizer"


def test_records_over_the_size_limit_are_skipped_unread(tmp_path, capsys):
    images = image_folder(tmp_path)
    lines = [llava("ok", "good.jpg"), llava("huge", "good.jpg", text="<image>\n" + "x" * 200_000)]
    src = write_jsonl(tmp_path / "in.jsonl", lines + [llava("ok2", "good.jpg")])
    out = tmp_path / "out"
    args = ["prepare", "--input", str(src), "--images", str(images), "--out", str(out)]
    assert sail_data([*args, "--max-record-bytes", "100000"]) == 0
    report = _report(out)
    assert report["written"] == 2 and report["skipped_by_reason"] == {"record_too_large": 1}
    assert report["skipped"][0]["source"] == "in.jsonl:2", "the lines after it keep their numbers"


def test_json_arrays_with_deep_records(tmp_path):
    from sail_megatron.data.records import InputError, RecordProblem, read_records

    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps([{"id": 1}, {"id": _nested(200)}]))
    values = [r.value for r in read_records(deep)]
    assert values[0] == {"id": 1} and isinstance(values[1], RecordProblem) and values[1].reason == "record_too_deep"
    deeper = tmp_path / "deeper.json"
    deeper.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="nested more than 100 levels"):
        list(read_records(deeper))


# --- messages that say what happened ----------------------------------------------------------------


def _captions(tmp_path: Path, n: int) -> Path:
    return write_jsonl(tmp_path / "c.jsonl", [{"image": "good.jpg", "caption": f"Noise {i}."} for i in range(n)])


def test_split_messages_name_the_flag_given_and_the_share_held_out(tmp_path, capsys):
    images = image_folder(tmp_path)
    src = _captions(tmp_path, 40)
    args = ["prepare", "--input", str(src), "--images", str(images), "--format", "caption"]
    assert sail_data([*args, "--out", str(tmp_path / "a"), "--valid-fraction", "0.01", "--shard-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "splits (whole shards): train 32 (80.0 %), val 8 (20.0 %), test 0 (0.0 %)" in out
    assert "--valid-fraction 0.01 asked for 1 % held out" in out and "20.0 % is held out" in out
    assert _report(tmp_path / "a")["split_samples"] == {"train": 32, "val": 8, "test": 0}

    assert sail_data([*args, "--out", str(tmp_path / "b"), "--valid-fraction", "0.02"]) == 2
    err = capsys.readouterr().err
    assert "--valid-fraction 0.02" in err and "--split-ratio" not in err and "--shard-size 1" in err
    assert sail_data([*args, "--out", str(tmp_path / "c"), "--valid-fraction", "0.2", "--split-ratio", "1,0,0"]) == 2
    assert "not both" in capsys.readouterr().err

    assert sail_data([*args, "--out", str(tmp_path / "d"), "--num-shards", "100", "--shard-index", "99"]) == 2
    err = capsys.readouterr().err
    assert "holds 40 records" in err and "empty" not in err
    for name in "bcd":
        _no_leftovers(tmp_path / name)


def test_join_refuses_missing_parts_and_a_folder_as_out(tmp_path, capsys):
    parts = [_fake_part(tmp_path / f"part-{k}", {"input_shard": {"num_shards": 3, "shard_index": k}}) for k in (0, 2)]
    join = ["join", "--parts", *map(str, parts)]
    assert sail_data([*join, "--out", str(tmp_path / "blend.yaml")]) == 2
    err = capsys.readouterr().err
    assert "shards [1] are missing" in err and "--allow-missing-parts" in err
    for extra in ([], ["--overwrite"]):
        assert sail_data([*join, "--allow-missing-parts", "--out", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert "is a folder" in err and "blend.yaml" in err and "--overwrite" not in err


def test_show_many_records_in_one_call_well_under_a_second_each(tmp_path):
    from sail_megatron.data.demo_dataset import write_demo_raw

    raw = write_demo_raw(tmp_path / "raw")
    args = [
        "show",
        "--input",
        str(raw.sft_jsonl),
        "--images",
        str(raw.images_dir),
        "--tokenizer",
        str(raw.tokenizer_dir),
    ]
    started = time.monotonic()
    done = run_cli(*args, "--index", "0-39", "--json")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    shown = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(shown) == 40 and all(sum(s["loss_mask"]) > 0 for s in shown)
    assert took / 40 < 0.5, f"{took:.1f} s for 40 records"


def test_index_lists_and_ranges():
    from sail_megatron.data.show import parse_indexes

    assert parse_indexes("3") == [3] and parse_indexes("0-2, 7,5-5") == [0, 1, 2, 7, 5]
    for bad in ("-1", "3-1", "a", "1,,2", "0-999999999"):
        with pytest.raises(ValueError, match="--index"):
            parse_indexes(bad)
