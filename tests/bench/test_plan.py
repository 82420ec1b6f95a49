"""`sail-bench plan`: the command line (a subprocess on a real recipe, seconds), the JSON document, the pick,
the budgets it converts, a measured report carried over, and its errors (exit 2, naming the flag). The data
it measures: test_plan_data.py; its communication model: test_plan_communication.py."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sail_megatron.bench import cli
from sail_megatron.bench.plan import plan
from sail_megatron.bench.plan.gpus import GPUS
from sail_megatron.bench.plan.render import render
from sail_megatron.config.train import load_train_config

ROOT = Path(__file__).resolve().parents[2]
ADVANCE_2B = "examples/configs/sail-vl-2b/2-pretrain-advance.yaml"
SFT_8B = "examples/configs/sail-vl-8b/3-sft-knowledge.yaml"
LAYOUT_KEYS = {
    "tp",
    "pp",
    "dp",
    "micro_batch_size",
    "memory_gib_per_gpu",
    "memory_split_gib",
    "fits",
    "tokens_per_s_per_gpu",
    "comm_fraction",
    "step_s",
    "gpu_hours",
    "days",
    "recompute_granularity",
    "recompute_vision",
    "distributed_optimizer",
    "picked",
    "ep",
    "vision_parallel",
}


def _plan_cli(*args, timeout=120):
    began = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "sail_megatron.bench", "plan", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return run, time.monotonic() - began


@pytest.fixture(scope="module")
def advance_2b_json():
    run, seconds = _plan_cli("--config", ADVANCE_2B, "--gpus", "256", "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout), seconds


def test_table_on_a_real_recipe_in_seconds():
    run, seconds = _plan_cli("--config", ADVANCE_2B, "--gpus", "256")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.startswith(f"sail-bench plan: {ADVANCE_2B} on 256 x H100")
    for line in (
        "budget: ",
        "data (assumed: data.path /data/sail-vl/pretrain-advance/blend.yaml not found here): caption-like samples",
        "throughput: 40% of the H100",
        "communication: NVLink 450 GB/s inside a node, 50 GB/s per GPU between nodes",
        "picked (*): ",
    ):
        assert line in out, line
    header = next(line for line in out.splitlines() if "tok/s/GPU" in line)
    for column in (
        "TP",
        "PP",
        "DP",
        "mbs",
        "weights",
        "grads",
        "optim",
        "activ",
        "loader",
        "fits",
        "MFU",
        "comm",
        "GPU-hours",
        "days",
    ):
        assert column in header
    assert sum(line.startswith("*") for line in out.splitlines()) == 1  # one picked row
    assert seconds < 30  # pure arithmetic: a few seconds, most of it importing torch


def test_json_document(advance_2b_json):
    doc, seconds = advance_2b_json
    assert seconds < 30
    assert doc["params_total"] > 2e9 and doc["budget_tokens"] == 524e9  # the recipe's run.train_tokens
    assert doc["data"]["kind"] == "caption-like" and doc["data"]["image_token_fraction"] > 0.9
    assert 0.4 < doc["vit_flops_share"] < 0.6  # the ViT trains: about half of SAIL-VL-2B's FLOPs
    layouts = doc["layouts"]
    assert layouts and all(LAYOUT_KEYS <= set(r) for r in layouts)
    assert {(r["tp"], r["pp"]) for r in layouts} == {(1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (2, 4)}
    for r in layouts:
        assert r["tp"] * r["pp"] * r["dp"] == 256
        assert r["micro_batch_size"] == 1  # packing on: one packed row per micro-batch
        assert r["memory_gib_per_gpu"] == pytest.approx(sum(r["memory_split_gib"].values()))
        assert r["fits"] == (r["memory_gib_per_gpu"] <= doc["usable_memory_gib"])
        assert 0 <= r["comm_fraction"] < 1 and (r["comm_fraction"] > 0) == (r["tp"] > 1 or r["pp"] > 1)
        assert r["gpu_hours"] == pytest.approx(doc["budget_tokens"] / r["tokens_per_s_per_gpu"] / 3600)
        assert r["days"] == pytest.approx(r["gpu_hours"] / 256 / 24)
    picked = [r for r in layouts if r["picked"]]
    assert len(picked) == 1 and picked[0] == doc["picked"] and picked[0]["fits"]
    fastest = max(r["tokens_per_s_per_gpu"] for r in layouts if r["fits"])
    assert picked[0]["tokens_per_s_per_gpu"] >= 0.995 * fastest
    # Pipelines keep several micro-batches of ViT activations on their first stage: some cannot fit.
    assert any(not r["fits"] for r in layouts)


def test_a_layout_that_cannot_fit_is_marked_so():
    cfg = load_train_config(ROOT / SFT_8B)
    doc = plan(cfg, 8)
    by = {
        (r["tp"], r["pp"], r["distributed_optimizer"], r["recompute_granularity"], r["recompute_vision"]): r
        for r in doc["layouts"]
    }
    # 7.9B parameters trained with Adam and no sharding: 16 bytes each, 118 GiB before any activation.
    whole = by[(1, 1, False, "full", True)]
    assert whole["memory_split_gib"]["weights"] + whole["memory_split_gib"]["optimizer"] > 100
    assert not whole["fits"] and not whole["picked"]
    assert doc["picked"]["fits"] and doc["picked"]["tp"] * doc["picked"]["pp"] > 1
    # The other GPUs: an H200 holds more, an A100 is slower for the same layout.
    h200, a100 = (
        plan(load_train_config(ROOT / SFT_8B), 8, gpu="h200"),
        plan(load_train_config(ROOT / SFT_8B), 8, "a100"),
    )
    assert sum(r["fits"] for r in h200["layouts"]) > sum(r["fits"] for r in doc["layouts"])
    assert a100["layouts"][0]["tokens_per_s_per_gpu"] < doc["layouts"][0]["tokens_per_s_per_gpu"]
    assert set(GPUS) == {"h100", "h200", "a100"}


def test_the_moe_recipe_is_planned_with_its_experts_split():
    cfg = load_train_config(ROOT / "examples/configs/sail-vl2-moe/3-sft-knowledge.yaml")
    doc = plan(cfg, 64)
    assert doc["moe"] and doc["picked"] is not None

    def row(ep: int):
        (r,) = [
            r
            for r in doc["layouts"]
            if (
                r["tp"],
                r["pp"],
                r["ep"],
                r["recompute_granularity"],
                r["recompute_vision"],
                r["distributed_optimizer"],
            )
            == (1, 1, ep, "full", True, True)
        ]
        return r

    eps = sorted({r["ep"] for r in doc["layouts"]})
    assert eps == [1, 2, 4, 8, 16, 32, 64]
    # Experts hold ~97% of the language model: split 8 ways, a GPU's weights and gradients shrink ~6x; the
    # optimizer state is sharded over all 64 ranks either way (the experts' over the ranks sharing them).
    one, eight = row(1)["memory_split_gib"], row(8)["memory_split_gib"]
    assert 5 < one["weights"] / eight["weights"] < 8 and 5 < one["grads"] / eight["grads"] < 8
    assert eight["optimizer"] == pytest.approx(one["optimizer"], rel=0.05)
    assert not row(1)["fits"] and row(8)["fits"]  # the recipe's layout fits; without EP the weights alone do not
    # The expert all-to-alls are the price: EP=16 leaves the node and slows down.
    assert row(16)["tokens_per_s_per_gpu"] < row(8)["tokens_per_s_per_gpu"]
    header = next(line for line in render(doc).splitlines() if line.lstrip().startswith("TP"))
    assert header.split()[:4] == ["TP", "PP", "EP", "DP"] and f"EP={doc['picked']['ep']} DP" in render(doc)


def test_budgets_in_samples_and_steps():
    cfg = load_train_config(ROOT / SFT_8B)  # run.train_samples: 21M
    assumed = plan(cfg, 64)
    assert assumed["data"]["kind"] == "SFT-like"
    assert assumed["budget_tokens"] == pytest.approx(21e6 * assumed["data"]["mean_tokens_per_sample"])
    given = plan(load_train_config(ROOT / SFT_8B), 64, tokens_per_sample=2000)
    assert given["budget_tokens"] == 21e6 * 2000 and "--tokens-per-sample" in given["budget"]
    steps = plan(load_train_config(ROOT / SFT_8B, ["run.train_samples=null", "run.train_steps=1000"]), 64)
    per_row = steps["data"]["mean_tokens_per_row"]
    assert steps["budget_tokens"] == pytest.approx(1000 * 256 * per_row) and per_row <= 4096


def test_a_measured_report_is_carried_over(tmp_path):
    report = tmp_path / "bench.json"
    report.write_text(
        json.dumps(
            {
                "device": "NVIDIA H100 80GB HBM3",
                "world_size": 8,
                "results": {"packed": {"mfu": 0.3, "tokens_per_s_per_device": 5000.0}},
                "resolved_config": {
                    "model_preset": "sail-vl-8b",
                    "parallel": {"tensor_model_parallel_size": 2, "recompute_granularity": "selective"},
                    "data": {"micro_batch_size": 1},
                    "run": {"global_batch_size": 64},
                },
            }
        )
    )
    doc = plan(load_train_config(ROOT / SFT_8B), 64, measured=str(report))
    assert doc["throughput"]["measured"]["mfu"] == 0.3 and "30.0% MFU measured" in doc["throughput"]["description"]
    same = [
        r
        for r in doc["layouts"]
        if (r["tp"], r["pp"], r["recompute_granularity"], r["recompute_vision"], r["vision_parallel"])
        == (2, 1, "selective", False, "tensor")
    ]
    assert same and all(r["mfu"] == pytest.approx(0.3) for r in same)  # the measured layout gets its MFU back


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--gpus", "0"], "--gpus"),
        (["--gpus", "7"], "--gpus"),  # no layout: 7 does not divide the global batch of 256 rows
        (["--gpus", "8", "--gpu", "b200"], "--gpu"),
        (["--gpus", "8", "--mfu", "0"], "--mfu"),
        (["--gpus", "8", "--mfu", "1.5"], "--mfu"),
        (["--gpus", "8", "--measured", "/no/such/report.json"], "--measured"),
        (["--gpus", "8", "--measured", str(ROOT / ADVANCE_2B)], "--measured"),  # not JSON
        (["--gpus", "8", "--inter-node-gbytes-per-s", "0"], "--inter-node-gbytes-per-s"),
        (["--gpus", "8", "--intra-node-gbytes-per-s", "-450"], "--intra-node-gbytes-per-s"),
    ],
)
def test_errors_name_the_flag(capsys, args, flag):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--config", str(ROOT / ADVANCE_2B), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag}" in err, err


def test_measured_report_without_mfu_is_refused(tmp_path, capsys):
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"device": "CPU (2 threads/rank)", "results": {"baseline": {"mfu": None}}}))
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--config", str(ROOT / ADVANCE_2B), "--gpus", "8", "--measured", str(cpu)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --measured" in err and "no measured MFU" in err
