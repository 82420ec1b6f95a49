"""`sail-convert` on bad arguments and unwritable outputs: exit code 2 and a short message naming the path
or the argument, nothing left behind; and the notes it owes the user on runs that succeed (no tokenizer
exported, no image-token id recorded, a dtype picked for mixed-dtype weights)."""

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict

import pytest
import torch
import yaml

from sail_megatron.convert.checks import resolve_dtype
from sail_megatron.convert.cli import main
from sail_megatron.convert.errors import ConversionError
from sail_megatron.convert.hf_io import SafetensorsFolder, parse_size
from sail_megatron.convert.outputs import TOKENIZER_FILES
from sail_megatron.convert.to_hf import mcore_to_hf
from sail_megatron.convert.to_mcore import hf_to_mcore
from sail_megatron.convert.verify import verify
from tests.convert import cli_workers
from tests.convert import fixtures as F
from tests.helpers.multiprocess import run_on_ranks

READ_ONLY = Path("/sys")  # refuses new folders even to root, for whom permission bits do not count


def _parse_error(capsys, argv) -> str:
    """Arguments refused by the parser: exit code 2 before anything is read or loaded."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("size", ["lots", "0", "-1GB", "nan", "0.5"])
def test_bad_shard_size_is_refused_by_the_parser(capsys, tmp_path, size):
    err = _parse_error(
        capsys,
        ["mcore-to-hf", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "out"), f"--max-shard-size={size}"],
    )
    assert "argument --max-shard-size" in err and f"{size!r} is not a shard size" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,value", [("--tiles", "0"), ("--text-tokens", "-1"), ("--tiles", "two")])
def test_verify_sizes_must_be_positive(capsys, tmp_path, option, value):
    err = _parse_error(capsys, ["verify", "--hf", str(tmp_path), "--ckpt", str(tmp_path), option, value])
    assert f"argument {option}: must be a positive integer, got {value!r}" in err, err


def test_the_functions_check_the_same_before_loading(tiny_checkpoints, tmp_path):
    with pytest.raises(ConversionError, match="bad --max-shard-size: 'lots' is not a shard size"):
        mcore_to_hf(tiny_checkpoints / "mcore", tmp_path / "out", max_shard_size="lots")
    with pytest.raises(ConversionError) as err:
        verify(tiny_checkpoints / "hf", tiny_checkpoints / "mcore", tiles=0, text_tokens=-1)
    assert "--tiles must be a positive integer, got 0" in str(err.value)
    assert "--text-tokens must be a positive integer, got -1" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2 GiB") == 2 << 30 and parse_size("1KB") == 1000
    assert parse_size("123") == 123 and parse_size(4096) == 4096


def test_out_that_is_a_file(tiny_checkpoints, tmp_path):
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(ConversionError) as err:
        hf_to_mcore(tiny_checkpoints / "hf", tmp_path / "afile")
    assert (
        str(err.value).splitlines()[0] == f"cannot write {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, "
        "not a folder"
    )


def _hf_copy(tiny_checkpoints: Path, dest: Path) -> Path:
    return shutil.copytree(tiny_checkpoints / "hf", dest)


def _lines(err: ConversionError):
    return str(err).splitlines()


@pytest.mark.parametrize(
    "damage,root_problem",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "the file is truncated"),
        (lambda p: p.write_bytes(b""), "too short to be a safetensors file (0 bytes)"),
        (lambda p: p.write_bytes(b"\x10\0\0\0\0\0\0\0" + b"{not json} " * 20), "unreadable header"),
    ],
)
def test_a_damaged_shard_is_one_problem_not_one_per_tensor(tiny_checkpoints, tmp_path, damage, root_problem):
    hf = _hf_copy(tiny_checkpoints, tmp_path / "hf")
    shard = hf / "model-00002-of-00002.safetensors"
    damage(shard)
    with pytest.raises(ConversionError) as err:
        SafetensorsFolder(hf)
    lines = _lines(err.value)
    assert len(lines) == 3, lines
    assert lines[1].startswith(f"  - {shard.name}: ") and root_problem in lines[1], lines
    assert lines[2].startswith("  - and ") and f"that {shard.name} should hold" in lines[2], lines


def test_dtype_auto_says_what_it_chose_for_mixed_weights(caplog):
    with caplog.at_level(logging.WARNING, logger="sail_megatron.convert.checks"):
        chosen = resolve_dtype("auto", [torch.float32] * 3 + [torch.bfloat16] * 2, source="HF")
    assert chosen == "fp32"
    assert "HF mixes fp32 (3 tensors), bf16 (2 tensors); using fp32 for every tensor" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sail_megatron.convert.checks"):
        assert resolve_dtype("auto", [torch.bfloat16] * 2) == "bf16"
    assert not caplog.text


@pytest.fixture(scope="module")
def cli_runs(tiny_checkpoints, tmp_path_factory):
    """Every CLI case of this module in one spawned process."""
    root = tmp_path_factory.mktemp("cli_errors")
    hf, mcore = tiny_checkpoints / "hf", tiny_checkpoints / "mcore"
    (root / "afile").write_bytes(b"")
    tok = root / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf / name, tok / name)
    for run, tokenizer in (("run_tok", str(tok)), ("run_gone_tok", str(root / "gone")), ("run_bare", "")):
        shutil.copytree(tiny_checkpoints / "run", root / run)
        config = yaml.safe_load((root / run / "config.yaml").read_text())
        config["data"]["tokenizer"] = tokenizer
        (root / run / "config.yaml").write_text(yaml.safe_dump(config))
    notok = _hf_copy(tiny_checkpoints, root / "hf_notok")
    for name in TOKENIZER_FILES:
        (notok / name).unlink(missing_ok=True)
    cases = {
        "hf_under_file": ["hf-to-mcore", "--hf", str(hf), "--out", str(root / "afile" / "sub")],
        "mcore_under_file": ["mcore-to-hf", "--ckpt", str(mcore), "--out", str(root / "afile" / "sub")],
        "hf_read_only": ["hf-to-mcore", "--hf", str(hf), "--out", str(READ_ONLY / "sail-convert-test" / "out")],
        "mcore_read_only": ["mcore-to-hf", "--ckpt", str(mcore), "--out", str(READ_ONLY / "sail-convert-test")],
        "run_tok": ["mcore-to-hf", "--ckpt", str(root / "run_tok"), "--out", str(root / "run_tok.hf")],
        "run_gone_tok": ["mcore-to-hf", "--ckpt", str(root / "run_gone_tok"), "--out", str(root / "run_gone_tok.hf")],
        "run_bare": ["mcore-to-hf", "--ckpt", str(root / "run_bare"), "--out", str(root / "run_bare.hf")],
        "hf_notok": ["hf-to-mcore", "--hf", str(notok), "--out", str(root / "notok.mcore")],
    }
    if os.geteuid() != 0:  # permission bits bind everyone but root
        (root / "locked").mkdir(mode=0o555)
        cases["mcore_locked"] = ["mcore-to-hf", "--ckpt", str(mcore), "--out", str(root / "locked" / "out")]
    # Refused from the arguments alone (before the checkpoint is read), and an InternViT of 3 layers under the
    # default --select-layer (-4).
    transformers = ["--format", "transformers", "--template", "garbage"]
    cases["bad_template"] = [
        "mcore-to-hf",
        "--ckpt",
        str(root / "run_tok"),
        "--out",
        str(root / "tpl.hf"),
        *transformers,
    ]
    F.write_standalone(root / "qwen", root / "vit", F.build_modules(F.Spec(seed=20)))
    stage1 = ["init", "--llm", str(root / "qwen"), "--vision", str(root / "vit")]
    cases["init_default_select_layer"] = [*stage1, "--out", str(root / "init")]
    # A disk too full for any output: every command that writes ends with one message, nothing left behind.
    full = root / "full"
    mounted, why = _mount_small_tmpfs(full)
    if mounted:
        cases["full_mcore_to_hf"] = ["mcore-to-hf", "--ckpt", str(tiny_checkpoints / "run"), "--out", str(full / "exp")]
        cases["full_hf_to_mcore"] = ["hf-to-mcore", "--hf", str(hf), "--out", str(full / "h2m")]
        cases["full_init"] = [*stage1, "--select-layer", "-1", "--out", str(full / "init")]
    try:
        (results,) = run_on_ranks(cli_workers.run_cli, 1, list(cases.values()), timeout=600)
        left_on_full_disk = sorted(p.name for p in full.iterdir()) if mounted else None
    finally:
        if mounted:
            _unmount(full)
    return root, dict(zip(cases, results)), {"on_full_disk": left_on_full_disk, "not_mounted": why}


FREE_ON_FULL_DISK = 192 << 10
"""What the filler leaves free on the 2 MiB tmpfs: less than any output of the tiny model needs."""


def _mount_small_tmpfs(folder: Path):
    """(True, None) with a 2 MiB tmpfs at `folder` holding a filler that leaves FREE_ON_FULL_DISK, or
    (False, why not)."""
    if os.geteuid() != 0:
        return False, "mounting a tmpfs needs root"
    folder.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"mount failed: {e}"
    if done.returncode != 0:
        return False, f"mount failed: {done.stderr.strip() or done.returncode}"
    try:
        with open(folder / "filler", "wb") as f:
            f.write(b"\0" * (shutil.disk_usage(folder).free - FREE_ON_FULL_DISK))
    except BaseException:
        _unmount(folder)
        raise
    return True, None


def _unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def _refused(result: Dict, *needles: str) -> str:
    assert result["rc"] == 2, result["stderr"]
    assert "Traceback" not in result["stderr"], result["stderr"]
    lines = cli_workers.error_lines(result)
    assert 1 <= len(lines) <= 2 and all(n in lines[0] for n in needles), result["stderr"]
    return lines[0]


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.rglob("*.partial-*")]


@pytest.mark.parametrize("case", ["hf_under_file", "mcore_under_file"])
def test_out_under_a_file(cli_runs, case):
    root, results, _ = cli_runs
    _refused(results[case], f"cannot write {root / 'afile' / 'sub'}", f"{root / 'afile'} is a file, not a folder")
    assert (root / "afile").read_bytes() == b""
    _no_leftovers(root)


@pytest.mark.skipif(not READ_ONLY.is_dir(), reason="needs /sys")
@pytest.mark.parametrize("case", ["hf_read_only", "mcore_read_only"])
def test_out_in_a_read_only_folder(cli_runs, case):
    _, results, _ = cli_runs
    _refused(results[case], "cannot write /sys/sail-convert-test", "/sys")
    assert not (READ_ONLY / "sail-convert-test").exists()


def test_out_in_a_folder_without_permission(cli_runs):
    root, results, _ = cli_runs
    if "mcore_locked" not in results:
        pytest.skip("root may write anywhere")
    _refused(results["mcore_locked"], f"no permission to create folders in {root / 'locked'}")
    assert list((root / "locked").iterdir()) == []


def test_trainer_run_exports_the_tokenizer_it_recorded(cli_runs):
    root, results, _ = cli_runs
    assert results["run_tok"]["rc"] == 0, results["run_tok"]["stderr"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (root / "run_tok.hf" / name).read_bytes() == (root / "tok" / name).read_bytes()
    assert "no tokenizer" not in results["run_tok"]["stderr"]


def test_trainer_run_without_its_tokenizer_says_so(cli_runs):
    root, results, _ = cli_runs
    gone, bare = results["run_gone_tok"], results["run_bare"]
    assert gone["rc"] == 0 and bare["rc"] == 0, gone["stderr"] + bare["stderr"]
    assert f"names the tokenizer {root / 'gone'}, but it holds no tokenizer files" in gone["stderr"]
    for result, out in ((gone, "run_gone_tok.hf"), (bare, "run_bare.hf")):
        assert "the export has no tokenizer: pass --tokenizer DIR" in result["stderr"], result["stderr"]
        assert not (root / out / "tokenizer.json").exists()


def test_hf_folder_without_tokenizer_warns_about_the_image_token(cli_runs):
    root, results, _ = cli_runs
    result = results["hf_notok"]
    assert result["rc"] == 0, result["stderr"]
    assert "no tokenizer with an <IMG_CONTEXT> token" in result["stderr"] and "--image-token-id" in result["stderr"]


def test_an_unknown_template_is_refused_by_the_parser(cli_runs):
    root, results, _ = cli_runs
    result = results["bad_template"]
    assert result["rc"] == 2, result["stderr"]
    assert "argument --template: invalid choice: 'garbage'" in result["stderr"], result["stderr"]
    assert "'sailvl-chat'" in result["stderr"] and "Traceback" not in result["stderr"]
    assert not (root / "tpl.hf").exists()


def test_init_names_the_select_layer_that_leaves_no_layer(cli_runs):
    root, results, _ = cli_runs
    assert cli_workers.error_lines(results["init_default_select_layer"]) == [
        "sail-convert init: cannot build a stage-1 model from these folders: --select-layer -4 (the default for "
        f"InternViT) leaves 0 of the 3 layers of {root / 'vit'}",
        "Fix: pass --select-layer with a value in [1, 3] or [-3, -1]",
    ]
    assert results["init_default_select_layer"]["rc"] == 2 and not (root / "init").exists()


@pytest.mark.parametrize(
    "case,command,out",
    [
        ("full_mcore_to_hf", "mcore-to-hf", "exp"),
        ("full_hf_to_mcore", "hf-to-mcore", "h2m"),
        ("full_init", "init", "init"),
    ],
)
def test_a_full_disk_is_one_message_and_leaves_nothing(cli_runs, case, command, out):
    root, results, disk = cli_runs
    if disk["not_mounted"]:
        pytest.skip(f"no small filesystem to fill: {disk['not_mounted']}")
    out = root / "full" / out
    lines = cli_workers.error_lines(results[case])
    assert results[case]["rc"] == 2 and "Traceback" not in results[case]["stderr"], results[case]["stderr"]
    assert len(lines) == 2, results[case]["stderr"]
    assert re.fullmatch(
        rf"sail-convert {command}: cannot write {re.escape(str(out))}: the disk is full \(\d+\.\d MiB free on its "
        rf"filesystem now\); the partial output was removed: nothing was written at {re.escape(str(out))}",
        lines[0],
    ), lines[0]
    assert lines[1].startswith("Fix: free space there")
    assert disk["on_full_disk"] == ["filler"]  # no output, no hidden partial folder
