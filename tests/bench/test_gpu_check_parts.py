"""The gpu-check parts on the CPU: their registry and command line, and the logic of the parts that needs no
GPU (the fp8-vision cases with local fp32 layers and no FP8, the moe-experts comparison of local experts against
a local copy, the restart part's reading of a run, the init-from part's models). The parts themselves run on a GPU (docs/gpu.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sail_megatron.bench.gpu_check import (
    DEFAULT_BUDGET_S,
    WORKERS,
    default_parts,
    fp8_vision,
    init_from,
    moe_experts,
    restart,
)
from sail_megatron.bench.gpu_check.cli import chosen_parts, list_parts
from tests.helpers.multiprocess import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
PARTS = [
    "pytest-gpu",
    "layers",
    "moe-experts",
    "fp8-vision",
    "vision-graphs",
    "train-bf16",
    "train-fp8",
    "memory-model",
    "kernels-bench",
    "decode",
    "init-from",
    "restart",
    "kernel-tests",
]


def test_registry_order_limits_and_budget():
    parts = default_parts()
    assert [p.name for p in parts] == PARTS
    by = {p.name: p for p in parts}
    assert {p.name for p in parts if p.needs_te} == {"layers", "moe-experts", "fp8-vision", "train-fp8", "init-from"}
    assert by["restart"].timeout_s <= 150 and restart.TORCHRUN_LIMIT_S < by["restart"].timeout_s
    assert DEFAULT_BUDGET_S <= 8 * 60  # the check ends within 8 minutes
    assert all(p.timeout_s < DEFAULT_BUDGET_S / 2 for p in parts)  # no part can take most of the budget
    # Every worker a part starts is registered under its name.
    workers = {"env", "write-cpu-checkpoint", "layers", "moe-experts", "fp8-vision", "vision-graphs"}
    workers |= {"memory-model", "init-from"}
    assert workers | {"restart"} <= set(WORKERS)


def test_only_and_skip_keep_the_registry_order():
    parts = default_parts()
    assert [p.name for p in chosen_parts(parts, ["restart", "fp8-vision"], [])] == ["fp8-vision", "restart"]
    assert [p.name for p in chosen_parts(parts, [], ["init-from"])] == [
        n
        for n in PARTS
        if n not in ("restart", "init-from")  # restart runs only when named
    ]
    assert "restart" in list_parts(parts) and "(only with --only)" in list_parts(parts)
    listing = list_parts(parts).splitlines()
    assert [line.split()[0] for line in listing] == PARTS
    assert listing[PARTS.index("restart")].split()[1:3] == ["150", "s"]


def _check(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "sail_megatron.bench.gpu_check", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},
    )


def test_command_line_of_the_new_parts(tmp_path):
    listed = _check("--list")
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == PARTS
    # A known part is accepted, then refused for want of a GPU; an unknown one is a usage error.
    run = _check("--only", "fp8-vision", "--only", "restart", "--skip", "init-from", "--out", str(tmp_path / "r"))
    assert run.returncode == 2 and "gpu-check needs a CUDA GPU" in run.stderr
    bad = _check("--only", "checkpoint")
    assert bad.returncode == 2 and "invalid choice: 'checkpoint'" in bad.stderr
    assert not (tmp_path / "r").exists()


def test_a_worker_runs_from_its_command_line(tmp_path):
    # The subprocess entry the parts use; the environment probe is the one worker that needs no GPU.
    out = tmp_path / "environment.json"
    run = _check("worker", "env", str(out), "--root", str(ROOT))
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert doc["failures"] == [] and doc["figures"]["cuda_available"] is False and doc["figures"]["torch"]
    assert _check("worker", "no-such-worker", str(out)).returncode == 2


# --- fp8-vision -----------------------------------------------------------------------------------------------


def _row(tiles, vision_norm=1.0, projector_norm=1.0, **changes):
    grads = {"params": 4, "missing": 0, "nonfinite": 0}
    row = {
        "tiles": tiles,
        "output finite": True,
        "loss": 0.5,
        "vision grads": {**grads, "norm": vision_norm},
        "projector grads": {**grads, "norm": projector_norm},
    }
    row.update(changes)
    return row


def test_fp8_vision_judges_each_case():
    assert fp8_vision.judge_case(_row(3)) == []
    # Text-only: the blank tile's term is multiplied by zero, so zero gradients are right there, not with tiles.
    assert fp8_vision.judge_case(_row(0, vision_norm=0.0, projector_norm=0.0)) == []
    assert fp8_vision.judge_case(_row(3, vision_norm=0.0)) == ["vision gradients are all zero"]
    assert fp8_vision.judge_case(_row(9, **{"output finite": False, "loss": float("nan")})) == [
        "non-finite output",
        "loss nan",
    ]
    broken = _row(0)
    broken["vision grads"].update(nonfinite=1, missing=2)
    assert fp8_vision.judge_case(broken) == [
        "1 vision gradients non-finite",
        "2 of 4 vision parameters got no gradient",
    ]


def test_fp8_vision_cases_and_grad_stats():
    import torch

    assert fp8_vision.TILE_COUNTS == (1, 3, 8, 9, 17, 0)
    assert [fp8_vision.case_label(t) for t in (1, 0)] == ["1 tiles", "text only"]
    precision = fp8_vision.fp8_precision()
    assert (precision.dtype, precision.layers, precision.fp8, precision.fp8_vision) == ("bf16", "te", "hybrid", True)
    a, b, frozen = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    frozen.requires_grad_(False)
    a.grad = torch.tensor([3.0, 4.0])
    b.main_grad = torch.tensor([0.0, float("inf")])  # megatron's DDP keeps gradients here
    assert fp8_vision.grad_stats([a, b, frozen]) == {"params": 2, "missing": 0, "nonfinite": 1, "norm": 5.0}
    assert fp8_vision.grad_stats([torch.nn.Parameter(torch.zeros(1))])["missing"] == 1
    rows = [{"ok": True, "ViT tokens % 16": 0}, {"ok": False, "ViT tokens % 16": 8}, {"ok": False}]
    assert fp8_vision.summarize(rows) == (
        "1/3 FP8 ViT+projector forward/backward cases passed (finite, vision gradients non-zero with images); "
        "ViT tokens a multiple of 16 in 1/2"
    )


def _fp8_vision_cases_on_the_cpu(out):
    """The part's own loop on the CPU: local fp32 layers instead of TE FP8, DDP-wrapped as on the GPU.
    Returns, per model, its ViT positions per tile and its rows; and the failures recorded."""
    from sail_megatron.bench.gpu_check.helpers import Figures, check_models
    from sail_megatron.config import ParallelConfig, PrecisionConfig
    from sail_megatron.platform import destroy_distributed, init_distributed

    parallel = ParallelConfig()
    device = init_distributed(parallel, seed=7).device
    fig, results = Figures(out), {}
    try:
        for name, cfg in check_models(["tiny", "tiny-aimv2"]).items():
            rows = []
            local = PrecisionConfig(dtype="fp32", layers="local")
            fp8_vision.check_model(fig, name, cfg, parallel, local, device, rows)
            results[name] = (cfg.vision.num_positions, rows)
    finally:
        destroy_distributed()
    return results, fig.failures


def test_fp8_vision_cases_run_through_a_model_on_the_cpu(tmp_path):
    results, failures = run_on_ranks(_fp8_vision_cases_on_the_cpu, 1, tmp_path / "fp8-vision.json", timeout=300)[0]
    assert failures == []
    assert [positions for positions, _ in results.values()] == [65, 64]  # InternViT's CLS token; AIMv2 has none
    for name, (positions, rows) in results.items():
        assert [r["model"] for r in rows] == [name] * len(fp8_vision.TILE_COUNTS) and all(r["ok"] for r in rows), rows
        # Without FP8 no blank tile is added; text-only, the ViT runs on the model's one blank tile.
        assert [r["ViT tokens"] for r in rows] == [max(t, 1) * positions for t in fp8_vision.TILE_COUNTS]
        assert all(r["vision grad norm"] > 0 for r in rows if r["case"] != "text only")
        assert [r["vision grad norm"] for r in rows if r["case"] == "text only"] == [0.0]


# --- moe-experts ------------------------------------------------------------------------------------------------


def _moe_experts_on_the_cpu(out):
    """The part's code on the CPU in fp32, with local experts against a second local copy (TE's are GPU-only):
    the whole check_model as the worker runs it; then a fresh pair with experts 0 and 1 swapped in the copy's
    first MoE layer (what a wrong expert mapping in a checkpoint would do), and the class check asked for TE's
    grouped experts."""
    from sail_megatron.bench.gpu_check.helpers import Figures, check_batches, check_models, compare_logits, logits
    from sail_megatron.config import ParallelConfig
    from sail_megatron.platform import destroy_distributed, init_distributed
    from sail_megatron.training.optimizer import wrap_ddp

    parallel = ParallelConfig()
    device = init_distributed(parallel, seed=3).device
    fig, rows, timings = Figures(out), [], []
    try:
        name = "tiny-sail-vl2-moe"
        cfg = check_models([name])[name]
        args = dict(other="local", dtype="fp32", tokens=64)
        moe_experts.check_model(fig, name, cfg, parallel, device, rows, timings, **args, expected="SequentialMLP")
        local, copy = moe_experts.build_pair(cfg, parallel, device, out.parent / "pair", "local", "fp32")
        try:
            moe_experts.check_experts(copy, moe_experts.GROUPED)
            refused = None
        except RuntimeError as e:
            refused = str(e)
        first = moe_experts.moe_layers(copy)[0].experts
        for fc in ("linear_fc1", "linear_fc2"):
            a, b = moe_experts.expert_weights(first, fc)[:2]
            kept = a.detach().clone()
            a.data.copy_(b.data)
            b.data.copy_(kept)
        batch = check_batches(cfg)["padded"]
        swapped_logits = compare_logits(logits(local.eval(), batch, device), logits(copy.eval(), batch, device))
        chunks = [wrap_ddp(local.train(), parallel), wrap_ddp(copy.train(), parallel)]
        swapped = moe_experts.compare_moe_layers(local, copy, chunks, device, tokens=64)
    finally:
        destroy_distributed()
    return rows, timings, fig.failures, refused, swapped_logits, swapped


def test_moe_experts_compares_layers_and_catches_a_swapped_expert(tmp_path):
    rows, timings, failures, refused, swapped_logits, swapped = run_on_ranks(
        _moe_experts_on_the_cpu, 1, tmp_path / "moe-experts.json", timeout=300
    )[0]
    # Same weights, same layers: the logits and every MoE layer's output and gradients agree exactly.
    assert failures == []
    assert [r["compared"] for r in rows] == ["logits"] + [f"MoE layer {i}" for i in range(4)]
    assert all(r["ok"] for r in rows) and rows[0]["rel_l2"] == 0.0
    diffs = [v for r in rows[1:] for k, v in r.items() if "rel_l2" in k]
    assert len(diffs) == 4 * 5 and set(diffs) == {0.0}
    assert not any(r["zero gradients"] for r in rows[1:])
    assert [t["timed"] for t in timings] == ["MoE layer 0", "model step"]
    assert all(t["local ms"] > 0 and t["local copy tokens/s"] > 0 for t in timings)
    # Local experts where TE's grouped GEMM is expected: refused by name.
    assert refused.startswith("the model's experts are SequentialMLP, not TEGroupedMLP")
    # Two experts swapped in the first MoE layer: that layer fails on its output and both experts' gradients,
    # far beyond the tolerance; the other layers still agree, and the logits move.
    first, *others = swapped
    assert not first["ok"]
    for key in ("output rel_l2", "linear_fc1 grad rel_l2 (worst expert)", "linear_fc2 grad rel_l2 (worst expert)"):
        assert first[key] > 10 * moe_experts.MAX_LAYER_REL_L2, (key, first)
    assert all(r["ok"] for r in others)
    assert swapped_logits["rel_l2"] > 0


def test_moe_experts_gradients_and_summary():
    import torch

    p = torch.nn.Parameter(torch.ones(3))
    assert moe_experts.grad_of(p).tolist() == [0.0, 0.0, 0.0]  # no gradient: zero norm, judged as missing
    p.grad, p.main_grad = torch.ones(3), torch.full((3,), 2.0)
    assert moe_experts.grad_of(p).tolist() == [2.0, 2.0, 2.0]  # megatron's DDP keeps it in main_grad
    assert moe_experts.rel_l2(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5])) == pytest.approx(0.1)
    rows = [{"ok": True}, {"ok": True}, {"ok": False}]
    timing = {"model": "sail-vl2-moe-small", "timed": "MoE layer 0", "local ms": 12.0, "TE ms": 3.0}
    assert moe_experts.summarize(rows, [{**timing, "TE speed-up": 4.0}]) == (
        "2/3 TE-vs-local expert comparisons passed (logits rel L2 <= 0.05, each MoE layer <= 0.02); "
        "sail-vl2-moe-small MoE layer fwd+bwd: local 12.0 ms, TE 3.0 ms (4.0x)"
    )
    from sail_megatron.bench.gpu_check.helpers import check_models

    small = check_models(["sail-vl2-moe-small"])["sail-vl2-moe-small"]
    lang = small.language
    assert (lang.hidden_size, lang.num_experts, lang.moe_router_topk, lang.moe_ffn_hidden_size) == (2048, 128, 8, 768)
    assert lang.num_layers == 2 and small.vision.hidden_size == 64  # real-width experts, few layers, tiny ViT
    small.validate()


# --- restart ----------------------------------------------------------------------------------------------------


def test_restart_command_and_environment(tmp_path):
    argv = restart.train_argv(tmp_path / "demo", tmp_path / "run", python="python")
    assert argv[:9] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "-m",
    ]
    assert argv[9:12] == ["sail_megatron.train", "--config", "examples/configs/tiny/demo.yaml"]
    assert (ROOT / restart.RECIPE).is_file()
    for override in (
        f"data.path={tmp_path / 'demo' / 'blend.yaml'}",
        f"data.tokenizer={tmp_path / 'demo' / 'raw' / 'tokenizer'}",
        f"run.save_dir={tmp_path / 'run'}",
        "run.process_group_timeout_s=60",
        "run.inject_fault=exit@0:1",
        f"run.train_steps={restart.TRAIN_STEPS}",
    ):
        assert override in argv
    assert restart.LAUNCH_ENV["CUDA_VISIBLE_DEVICES"] == ""
    assert restart.LAUNCH_ENV["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_restart_reads_the_last_step_and_judges(tmp_path):
    log = "step      1/3 | 2.1K tok, 4 samples | loss 7.6\nstep      2/3 | 4.2K tok, 8 samples | loss 7.5\n"
    assert restart.last_step(tmp_path, log) == 2  # no metrics.jsonl: the console lines
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in ({"step": 1, "loss": 7.6}, {"step": 3, "loss": 7.4}, {"step": 3, "x": 1}))
    )
    assert restart.last_step(tmp_path, "") == 3
    assert restart.last_step(tmp_path / "none", "nothing") is None

    steps = restart.TRAIN_STEPS
    restarted = f"[default] Worker group FAILED. 1/1 attempts left; {restart.RESTART_LINE}\n"
    assert restart.judge(0, restarted, steps) == []
    assert restart.judge(0, "no restart here", steps) == ["torchrun's log shows no restart"]
    assert restart.judge(1, restarted, 1) == ["torchrun exited with 1", f"the run reached step 1 of {steps}"]
    assert restart.judge(None, restarted, None)[0] == f"torchrun did not finish within {restart.TORCHRUN_LIMIT_S} s"


# --- init-from --------------------------------------------------------------------------------------------------


def test_init_from_covers_every_family():
    from sail_megatron.bench.gpu_check.helpers import check_models

    models = check_models(init_from.FAMILIES)
    archs = {(cfg.vision.arch, cfg.language.arch) for cfg in models.values()}
    assert archs == {("internvit", "qwen2"), ("aimv2", "qwen2"), ("aimv2", "qwen3")}
    assert models["sail-vl-2b-small"].language.vocab_size == 151936  # real widths, fewer layers
    assert (models["sail-vl-2b-small"].vision.num_layers, models["sail-vl-2b-small"].language.num_layers) == (5, 2)
    assert [init_from.positions_every(n) for n in ("tiny-aimv2", "sail-vl2-2b-small")] == [1, 8]


@pytest.mark.parametrize("name", ["layers", "moe-experts", "fp8-vision", "init-from"])
def test_parts_that_need_te_are_skipped_without_it(tmp_path, name):
    from sail_megatron.bench.gpu_check import Context, run_parts

    part = next(p for p in default_parts() if p.name == name)
    ctx = Context(root=ROOT, out=tmp_path, env={"transformer_engine": None, "transformer_engine_error": "absent"})
    (result,) = run_parts([part], ctx, budget_s=100)
    assert result.status == "skipped" and "absent" in result.reason and "INSTALL_TE=1" in result.reason


def test_docs_list_every_part_with_its_limit():
    import re

    docs = (ROOT / "docs" / "gpu.md").read_text()
    table = dict(re.findall(r"^\| `([a-z0-9-]+)` \| (\d+) s \|", docs, re.M))
    assert table == {p.name: str(int(p.timeout_s)) for p in default_parts()}  # restart too: it runs with --only
    assert f"budget of {DEFAULT_BUDGET_S} s" in docs


# --- memory-model -----------------------------------------------------------------------------------------------


def test_memory_model_part_compares_with_the_planner(tmp_path):
    import torch

    from sail_megatron.bench.gpu_check import memory_check

    # Registered like the others: accepted by --only, then refused for want of a GPU; its worker too.
    run = _check("--only", "memory-model", "--out", str(tmp_path / "r"))
    assert run.returncode == 2 and "gpu-check needs a CUDA GPU" in run.stderr
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            memory_check.worker(None, ROOT)

    # What the part plans for (no GPU needed): the SFT recipe at micro-batch 1 on one GPU.
    cfg = memory_check.load_recipe(ROOT)
    assert (cfg.data.micro_batch_size, cfg.num_microbatches(1), cfg.model_preset) == (1, 2, "sail-vl-2b")
    seen, worst = memory_check.planned(cfg, 12), memory_check.planned(cfg)
    assert seen["state"] == worst["state"] > 20  # 2.05B parameters, all trained: 16 bytes each and more
    assert worst["activations"] > seen["activations"] > 0 and worst["total"] > seen["total"]
    figures = memory_check.compare({"state": seen["state"] * 1.01, "peak": seen["total"] * 0.9}, seen, worst)
    assert figures["model state error (%)"] == pytest.approx(1.0)
    assert figures["peak error (%)"] == pytest.approx(-10.0)
    summary = memory_check.summarize(figures)
    assert summary.startswith("peak ") and "(-10.0%)" in summary and "(+1.0%)" in summary
