"""`sail-bench plan`'s communication model (bench/plan_communication.py): one layout's bytes and seconds checked
by hand, what it does to the layouts' order, the DP reduction that overlap hides or does not, and its flags."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sail_megatron.bench.plan import plan
from sail_megatron.bench.plan.communication import CommunicationModel, Links
from sail_megatron.bench.plan.data import data_assumption
from sail_megatron.bench.plan.layouts import Layout
from sail_megatron.config.train import load_train_config

ROOT = Path(__file__).resolve().parents[2]
SFT_2B = ROOT / "examples/configs/sail-vl-2b/3-sft-knowledge.yaml"  # every part trains, no sequence parallelism
ADVANCE_2B = ROOT / "examples/configs/sail-vl-2b/2-pretrain-advance.yaml"
# SAIL-VL-2B: Qwen2.5-1.5B (28 layers, hidden 1536) and InternViT-300M (21 of its layers built, hidden 1024,
# 1025 tokens per 448 px tile); 4096-token rows, 256 of them per step, bf16; 2,051,967,488 parameters.
LAYERS, HIDDEN, VIT_LAYERS, VIT_HIDDEN, VIT_TOKENS, SEQ, BATCH, PARAMS = 28, 1536, 21, 1024, 1025, 4096, 256, 2051967488
NVLINK, NETWORK = 450e9, 50e9  # H100 defaults, bytes/s


def _layout(tp: int, dp: int, distributed_optimizer: bool = True, **kw) -> Layout:
    return Layout(
        tp=tp,
        pp=1,
        dp=dp,
        micro_batch_size=1,
        num_microbatches=BATCH // dp,
        recompute_granularity=kw.get("recompute", "selective"),
        recompute_method="uniform",
        recompute_num_layers=1,
        recompute_vision=kw.get("recompute_vision", False),
        distributed_optimizer=distributed_optimizer,
        sequence_parallel=False,
    )


def _row(doc, tp, pp=1, recompute="selective", vision=False, distributed_optimizer=True, vit="tensor"):
    (row,) = [
        r
        for r in doc["layouts"]
        if (r["tp"], r["pp"], r["recompute_granularity"], r["recompute_vision"], r["distributed_optimizer"])
        == (tp, pp, recompute, vision, distributed_optimizer)
        and r["vision_parallel"] == vit
    ]
    return row


def test_one_layout_by_hand():
    cfg = load_train_config(SFT_2B)
    data = data_assumption(cfg)
    model = CommunicationModel(cfg, data, Links(NVLINK, NETWORK))

    # TP=2 on one node: per micro-batch, 2 all-reduces per layer forward and 2 backward (selective
    # recomputation runs none again), language layers over the whole row, ViT layers over the row's tiles.
    (tp2,) = model.of(_layout(2, 4))
    language = LAYERS * 4 * SEQ * HIDDEN * 2
    vision = VIT_LAYERS * 4 * data.mean_tiles_per_row * VIT_TOKENS * VIT_HIDDEN * 2
    assert language == 1_409_286_144  # 1.41 GB: 112 messages of 12.6 MB, 3.13 ms at 450 GB/s
    assert 2 * (2 - 1) / 2 * language / NVLINK == pytest.approx(3.13e-3, abs=1e-5)
    assert tp2.tensor_parallel_bytes == pytest.approx(language + vision)
    assert tp2.tensor_parallel_s == pytest.approx(2 * (2 - 1) / 2 * (language + vision) / NVLINK)
    # ViT recomputation runs the forward collectives again: 6 per ViT layer.
    (again,) = model.of(_layout(2, 4, recompute_vision=True))
    assert again.tensor_parallel_bytes == pytest.approx(language + vision * 6 / 4)
    # DP=4 x TP=2 is one node: the distributed optimizer's reduce-scatter (fp32 gradients of the rank's half
    # of the model) and all-gather (bf16 weights) run over NVLink.
    assert tp2.gradient_bytes == 4 * sum(model.trainable_parameters(_layout(2, 4), 0))
    assert tp2.gradient_s == pytest.approx(3 / 4 * tp2.gradient_bytes / NVLINK)
    assert tp2.parameter_s == pytest.approx(3 / 4 * tp2.gradient_bytes / 2 / NVLINK)

    # DP=64 at TP=1 without the distributed optimizer: an all-reduce of every parameter's fp32 gradient over
    # 8 nodes, 8 ranks of the group on each, each ring channel on its own GPU's NIC: min(NVLink, 8 x 50 GB/s).
    (dp64,) = model.of(_layout(1, 64, distributed_optimizer=False))
    assert dp64.tensor_parallel_s == 0 and dp64.pipeline_s == 0 and dp64.parameter_s == 0
    assert dp64.gradient_bytes == 4 * PARAMS
    assert dp64.gradient_s == pytest.approx(2 * 63 / 64 * 4 * PARAMS / 400e9)  # 8.2 GB: 40 ms
    assert dp64.gradient_s == pytest.approx(0.0404, abs=1e-4)


def test_the_step_adds_what_does_not_overlap():
    cfg = load_train_config(SFT_2B)
    doc = plan(cfg, 8)
    tp2 = _row(doc, tp=2)
    tp1 = _row(doc, tp=1)
    # TP collectives are on the critical path: the step is its compute plus them (DP over NVLink is hidden).
    assert tp2["comm_s"]["data_parallel_exposed"] == 0 < tp2["comm_s"]["data_parallel_before_overlap"]
    assert tp2["step_s"] * tp2["comm_fraction"] == pytest.approx(tp2["comm_s"]["tensor_parallel"])
    assert tp1["comm_fraction"] == 0 and tp1["tokens_per_s_per_gpu"] > tp2["tokens_per_s_per_gpu"]
    # Without the overlap flags the reduction and the gather come on top of the step.
    off = plan(
        load_train_config(SFT_2B, ["parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false"]), 8
    )
    row = _row(off, tp=1)
    exposed = row["comm_s"]["data_parallel_exposed"]
    assert exposed == pytest.approx(row["comm_s"]["data_parallel_before_overlap"]) and exposed > 0
    assert row["step_s"] == pytest.approx(tp1["step_s"] + exposed)
    assert row["comm_fraction"] == pytest.approx(exposed / row["step_s"])


def test_tp1_beats_tp2_when_one_gpu_holds_the_model():
    # No recomputation: TP=1 fits, and TP=2 now costs its collectives (it planned as fast before).
    doc = plan(load_train_config(ADVANCE_2B, ["parallel.recompute_granularity=null"]), 256)
    tp1, tp2 = _row(doc, tp=1, recompute=None), _row(doc, tp=2, recompute=None)
    assert tp1["fits"] and tp2["fits"]
    assert tp1["tokens_per_s_per_gpu"] > 1.05 * tp2["tokens_per_s_per_gpu"]
    assert tp1["comm_fraction"] == 0 < tp2["comm_fraction"]
    assert doc["picked"]["tp"] == 1 and doc["picked"]["recompute_granularity"] is None


def test_days_scale_worse_than_one_over_n_where_dp_communication_shows():
    def picked_on(gpus, overrides=()):
        return plan(load_train_config(SFT_2B, list(overrides)), gpus)["picked"]

    # The recipe overlaps the reduction with the backward pass, which hides it: 1/N exactly.
    small, large = picked_on(64), picked_on(256)
    assert (small["tp"], large["tp"]) == (1, 1) and large["comm_fraction"] == 0
    assert large["gpu_hours"] == pytest.approx(small["gpu_hours"])
    # Not overlapped, the same bytes per step weigh more when each GPU has fewer micro-batches per step.
    off = ["parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false"]
    small, large = picked_on(64, off), picked_on(256, off)
    assert 0 < small["comm_fraction"] < large["comm_fraction"]
    assert large["gpu_hours"] > 1.05 * small["gpu_hours"] and small["days"] / large["days"] < 0.96 * 256 / 64


def test_bandwidth_flags_and_defaults():
    run = subprocess.run(
        [sys.executable, "-m", "sail_megatron.bench", "plan", "--config", str(SFT_2B), "--gpus", "256",
         "--inter-node-gbytes-per-s", "3.125", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    slow = json.loads(run.stdout)
    assert (slow["communication"]["intra_node_gbytes_per_s"], slow["communication"]["inter_node_gbytes_per_s"]) == (
        450,
        3.125,
    )
    assert "(--inter-node-gbytes-per-s)" in slow["communication"]["description"]
    fast = plan(load_train_config(SFT_2B), 256)
    assert slow["picked"]["comm_fraction"] > 0.3 > fast["picked"]["comm_fraction"]
    a100 = plan(load_train_config(SFT_2B), 256, gpu="a100")["communication"]
    assert (a100["intra_node_gbytes_per_s"], a100["inter_node_gbytes_per_s"]) == (300, 25)


# --- experts and where the ViT runs ------------------------------------------------------------------------------

MOE_SFT = ROOT / "examples/configs/sail-vl2-moe/3-sft-knowledge.yaml"  # full recomputation, every part trains


def test_expert_all_to_alls_and_expert_gradients_by_hand():
    # Qwen3-30B-A3B: 48 layers, hidden 2048, 8 of 128 experts per token, expert FFN 768; bf16 rows of 4096.
    cfg = load_train_config(MOE_SFT)
    data = data_assumption(cfg)
    model = CommunicationModel(cfg, data, Links(NVLINK, NETWORK))

    def moe_layout(ep: int, dp: int) -> Layout:
        return Layout(**{**_layout(1, dp, recompute="full").__dict__, "ep": ep, "etp": 1})

    (ep8,) = model.of(moe_layout(8, 64))
    # Forward, backward and the recomputed forward: 6 all-to-alls per layer, each of 4096 x 8 copies x 2048 x 2 B.
    per_micro_batch = 48 * 6 * 4096 * 8 * 2048 * 2
    assert ep8.expert_parallel_bytes == per_micro_batch
    assert ep8.expert_parallel_s == pytest.approx(7 / 8 * per_micro_batch / NVLINK)  # EP=8: inside a node
    (ep16,) = model.of(moe_layout(16, 64))
    assert ep16.expert_parallel_s == pytest.approx(15 / 16 * per_micro_batch / NETWORK)  # spans two nodes
    (ep1,) = model.of(moe_layout(1, 64))
    assert ep1.expert_parallel_bytes == 0 and ep1.expert_parallel_s == 0
    # Gradients: the dense part over the 64 DP ranks, the experts over the 8 ranks holding the same ones
    # (one per node: each ring channel on its own NIC, so the network's bandwidth).
    dense, experts = model.trainable_parameters(moe_layout(8, 64), 0)
    assert experts == 48 * 16 * 3 * 2048 * 768  # 16 of every layer's experts: fc1 (gate, up) and fc2
    assert ep8.gradient_bytes == 4 * (dense + experts)
    expected = 63 / 64 * 4 * dense / min(NVLINK, 8 * NETWORK) + 7 / 8 * 4 * experts / NETWORK
    assert ep8.gradient_s == pytest.approx(expected)


def test_a_vit_data_parallel_across_tp_gathers_image_tokens_instead_of_vit_collectives():
    cfg = load_train_config(SFT_2B)
    data = data_assumption(cfg)
    model = CommunicationModel(cfg, data, Links(NVLINK, NETWORK))
    (tensor,) = model.of(_layout(2, 4))
    (vit_data,) = model.of(Layout(**{**_layout(2, 4).__dict__, "vision_parallel": "data"}))
    language = LAYERS * 4 * SEQ * HIDDEN * 2
    vision = VIT_LAYERS * 4 * data.mean_tiles_per_row * VIT_TOKENS * VIT_HIDDEN * 2
    gather = 0.5 * 2 * data.mean_tiles_per_row * 256 * HIDDEN * 2  # the projector's outputs, forward and back
    assert tensor.tensor_parallel_bytes == pytest.approx(language + vision)
    assert vit_data.tensor_parallel_bytes == pytest.approx(language + gather)
    # The whole ViT on each rank: its gradients are the TP rank's to reduce over DP, so DP sends more.
    assert sum(model.trainable_parameters(Layout(**{**_layout(2, 4).__dict__, "vision_parallel": "data"}), 0)) > sum(
        model.trainable_parameters(_layout(2, 4), 0)
    )
