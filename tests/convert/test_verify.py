"""`sail-convert verify` passes on a matching pair and fails on a corrupted one; the CLI's exit codes."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.convert import fixtures as F
from tests.convert import workers
from tests.helpers.multiprocess import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(ROOT / "tools" / "sail_convert.py")]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(TOOL + list(args), cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    F.write_chat_checkpoint(root / "hf", F.build_modules(F.Spec(select_layer=-2, seed=30)))
    # One copy with a changed ViT layer scale (only images see it), one with a changed LM weight.
    for name, tensor in (
        ("bad_vit", "vision_model.encoder.layers.1.ls1"),
        ("bad_lm", "language_model.model.layers.0.mlp.down_proj.weight"),
    ):
        shutil.copytree(root / "hf", root / name)
        F.edit_tensors(root / name, lambda t, tensor=tensor: {**t, tensor: t[tensor] * 1.5})
    jobs = [dict(op="hf_to_mcore", hf_dir=str(root / "hf"), out_dir=str(root / "mcore"), tp=2)]
    jobs += [
        dict(op="verify", hf_dir=str(root / name), ckpt=str(root / "mcore"), atol=1e-4, min_top1=1.0)
        for name in ("hf", "bad_vit")
    ]
    converted, good, bad_vit = run_on_ranks(workers.convert_many, 1, jobs)[0]
    assert converted["ok"], converted
    return {"root": root, "good": good, "bad_vit": bad_vit}


def test_matching_pair_passes(pair):
    report = pair["good"]
    assert report.passed, report.format()
    assert [c.name for c in report.cases] == ["text", "image"]
    assert all(c.max_abs_diff < 1e-5 and c.top1_agreement == 1.0 for c in report.cases)


def test_corrupted_vision_weight_fails_on_images_only(pair):
    report = pair["bad_vit"]
    text, image = report.cases
    assert not report.passed
    assert text.max_abs_diff < 1e-5 and image.max_abs_diff > 1e-3, report.format()


def test_cli_verify_fails_on_a_corrupted_language_weight(pair):
    root = pair["root"]
    failed = _cli("verify", "--hf", str(root / "bad_lm"), "--ckpt", str(root / "mcore"))
    assert failed.returncode == 1, failed.stderr
    lines = failed.stdout.splitlines()
    assert lines[0].split() == ["case", "tokens", "max", "|logit", "diff|", "top-1", "agreement"]
    assert all(float(line.split()[2]) > 1e-3 for line in lines[1:3]) and lines[3].startswith("FAIL")


def test_cli_refuses_bad_input_with_exit_code_2(pair):
    root = pair["root"]
    refused = _cli("hf-to-mcore", "--hf", str(root / "hf"), "--out", str(root / "tp3"), "--tp", "3")
    assert refused.returncode == 2, refused.stderr
    assert "TP 3 does not divide the language num_attention_heads (4)" in refused.stderr
    assert not (root / "tp3").exists()
