"""sail-bench smoke runs on the tiny preset: the JSON document carries every figure, the PNG is drawn.
Timings are never asserted (2 shared CPU cores); only that they are there and sane in kind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.train_cli import torchrun_command

ROOT = Path(__file__).resolve().parents[2]
RESULT_KEYS = {
    "steps",
    "world_size",
    "step_time_s",
    "tokens_per_s",
    "tokens_per_s_per_device",
    "samples_per_s",
    "tiles_per_s",
    "tflops_per_s_per_device",
    "mfu",
    "mfu_fp8",
    "packing_utilization",
    "data_wait_frac",
    "peak_memory_gib",
    "breakdown_s_per_step",
    "final_loss",
}
PHASES = {
    "data_wait",
    "vision_forward",
    "language_forward",
    "backward",
    "pipeline_p2p",
    "grad_sync",
    "optimizer",
    "param_gather",
}


def _bench(tmp_path, nproc, *args):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = torchrun_command(
        "sail_megatron.bench",
        [
            "--steps",
            "2",
            "--warmup",
            "1",
            "--breakdown-steps",
            "1",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            *args,
        ],
        nproc,
    )
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert out_png.stat().st_size > 0
    return json.loads(out_json.read_text()), run.stdout


def _check(result):
    assert RESULT_KEYS <= set(result)
    assert set(result["breakdown_s_per_step"]) == PHASES
    assert result["tokens_per_s"] > 0 and result["tflops_per_s_per_device"] > 0
    assert result["mfu"] is None and result["mfu_fp8"] is None  # no tensor-core peak on the CPU


def test_synthetic_packed_vs_padded_under_pipeline_parallelism(tmp_path, demo):
    doc, stdout = _bench(
        tmp_path,
        2,
        "--config",
        "examples/configs/tiny/3-sft-knowledge.yaml",
        "--compare",
        "packing",
        "--compare",
        "kernels",
        "parallel.tensor_model_parallel_size=1",
        "run.global_batch_size=2",
        f"data.tokenizer={demo / 'raw' / 'tokenizer'}",
        "data.path=''",
    )  # synthetic: no dataset
    packed, padded = doc["results"]["packed"], doc["results"]["padded"]
    for r in (packed, padded):
        _check(r)
        assert r["world_size"] == 2 and r["breakdown_s_per_step"]["pipeline_p2p"] >= 0
    assert packed["packing_utilization"] > 0.9 > 0.6 > padded["packing_utilization"]
    assert "packed/padded tokens_per_s" in doc["ratios"] and "packed/padded" in stdout
    assert "skipped" in doc["results"]["triton-kernels"]  # no CUDA here: said, not faked


def test_real_data_dali_vs_pil(tmp_path, demo):
    doc, _ = _bench(
        tmp_path,
        1,
        "--config",
        "examples/configs/tiny/demo.yaml",
        "--data",
        "real",
        "--compare",
        "decoder",
        "parallel.tensor_model_parallel_size=1",
        "parallel.pipeline_model_parallel_size=1",
        "run.global_batch_size=2",
        f"data.tokenizer={demo / 'raw' / 'tokenizer'}",
        f"data.path={demo / 'blend.yaml'}",
    )
    for name in ("dali", "pil"):
        _check(doc["results"][name])
    assert doc["device"].startswith("CPU") and doc["resolved_config"]["data"]["path"].endswith("blend.yaml")


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_unwritable_outputs_are_refused_before_measuring(tmp_path, flag):
    # A folder where a file is wanted: refused by argparse (exit 2) before any process group or model.
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sail_megatron.bench",
            "--config",
            "examples/configs/tiny/demo.yaml",
            flag,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 2 and "is a folder" in run.stderr and "Traceback" not in run.stderr


def test_vision_layouts_side_by_side_with_their_communication(tmp_path, demo):
    doc, stdout = _bench(
        tmp_path,
        2,
        "--config",
        "examples/configs/tiny/demo.yaml",
        "--compare",
        "vision",
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=1",
        f"data.tokenizer={demo / 'raw' / 'tokenizer'}",
    )
    data, tensor = doc["results"]["vision-data"], doc["results"]["vision-tensor"]
    for r in (data, tensor):
        _check(r)
        assert 0 < r["vision_flops_share"] < 1 and r["vision_forward_s_per_step"] > 0
    # The same synthetic rows: each rank encodes about half the tiles under "data", all of them under "tensor".
    assert data["decoded_tiles_per_rank_per_step"]["mean"] * 2 == tensor["decoded_tiles_per_rank_per_step"]["mean"]
    # Counted, not estimated: the ViT's per-block all-reduces outweigh one all-gather of projector outputs
    # plus the vision gradients' all-reduce once per step.
    tp_bytes = {
        name: r["comm_bytes_per_micro_batch"]["tensor_parallel"] for name, r in (("data", data), ("tensor", tensor))
    }
    assert 0 < tp_bytes["data"] < tp_bytes["tensor"], tp_bytes
    assert "vision-data/vision-tensor tokens_per_s" in doc["ratios"] and "comm per micro-batch" in stdout
