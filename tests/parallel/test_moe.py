"""The mixture-of-experts language model (tiny-sail-vl2-moe: AIMv2 + Qwen3-MoE, 4 experts, top 2) under
megatron-core's MoE layers on the CPU: expert parallelism trains as one expert layout does, checkpoints
move between EP sizes, the load-balancing loss reaches the gradients, packing leaves a sample unchanged.

Two processes (gloo) share one data-parallel pair of rows per step whatever the EP size: EP 1 keeps every
expert on both ranks (expert gradients averaged over both), EP 2 puts two experts on each and sends tokens
to them by all-to-all (expert gradients from both ranks' tokens arrive with them)."""

import math

import pytest
import torch

from tests.helpers.multiprocess import run_on_ranks
from tests.parallel import moe_workers as W

ATOL = 2e-5  # fp32: EP changes only the order of sums (measured differences ~1e-6)
EXPERTS_PER_EP2_RANK = 2


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("moe_weights"))
    run_on_ranks(W.save_initial_weights, 1, directory)
    return directory


@pytest.fixture(scope="module")
def runs(weights, tmp_path_factory):
    """3 steps at EP 1 and at EP 2 (checkpoints at step 2); step 3 again at EP 1 from EP 2's checkpoint;
    EP 2's checkpoint read by a single process."""
    root = tmp_path_factory.mktemp("moe_runs")
    ep1 = run_on_ranks(W.train_ep, 2, 1, weights, 3, str(root / "ep1"), 2)
    ep2 = run_on_ranks(W.train_ep, 2, 2, weights, 3, str(root / "ep2"), 2)
    resumed = run_on_ranks(W.train_ep, 2, 1, weights, 3, str(root / "unused"), None, str(root / "ep2"))
    (read,) = run_on_ranks(W.read_checkpoint_weights, 1, str(root / "ep2"))
    return {"ep1": ep1, "ep2": ep2, "resumed": resumed, "read_ep2": read}


def _ep2_global(ep2, key: str):
    """EP 2's weights under the EP 1 names (each rank holds half the experts, the rest on both)."""
    out = {}
    for r in ep2:
        out.update(W.global_expert_names(r[key], r["ep_rank"], EXPERTS_PER_EP2_RANK))
    return out


def test_ep2_trains_to_the_losses_and_weights_of_ep1(runs):
    ep1, ep2 = runs["ep1"], runs["ep2"]
    assert ep2[0]["ep_rank"] != ep2[1]["ep_rank"]
    print("losses EP1", ep1[0]["losses"], "EP2", ep2[0]["losses"])
    torch.testing.assert_close(torch.tensor(ep2[0]["losses"]), torch.tensor(ep1[0]["losses"]), atol=1e-5, rtol=0)
    local = ep2[0]["final"]
    assert sum(".local_experts." in n and ".layers.0." in n for n in local) == 2 * EXPERTS_PER_EP2_RANK  # fc1, fc2
    full = _ep2_global(ep2, "final")
    assert sorted(full) == sorted(ep1[0]["final"])
    worst = max((full[n] - w).abs().max().item() for n, w in ep1[0]["final"].items())
    print(f"max |weight diff| EP2 vs EP1 after 3 steps: {worst:.2e}")
    assert worst < ATOL
    moved = [n for n, w in ep1[0]["final"].items() if ".mlp.experts." in n or ".mlp.router." in n]
    assert moved, "the experts and routers train"


def test_checkpoint_written_at_ep2_loads_at_ep1(runs):
    # Bitwise: the same tensors, only their owner changes.
    saved = _ep2_global(runs["ep2"], "saved")
    read = runs["read_ep2"]
    assert sorted(read) == sorted(saved)
    for name, w in saved.items():
        assert torch.equal(read[name], w), name
    # Weights, optimizer state and schedule: step 3 resumed at EP 1 is EP 2's step 3.
    resumed = runs["resumed"][0]
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(runs["ep2"][0]["losses"][2:]), atol=1e-5, rtol=0
    )
    final = _ep2_global(runs["ep2"], "final")
    worst = max((resumed["final"][n] - w).abs().max().item() for n, w in final.items())
    assert worst < ATOL, worst


def test_routing_figures_are_the_same_under_any_expert_layout(runs):
    ep1, ep2 = runs["ep1"][0]["routing"], runs["ep2"][0]["routing"]
    assert runs["ep1"][1]["routing"] == ep1, "every rank reports the reduced figures"
    for a, b in zip(ep1, ep2):
        assert len(a["moe_load_max_over_mean"]) == 4  # one per layer
        assert all(1.0 <= v <= 2.0 for v in a["moe_load_max_over_mean"])  # at most k * E / k = E / k = 2
        assert all(0.0 < v <= 1.0 for v in a["moe_load_entropy"])
        assert 0.0 < a["moe_router_entropy"] < math.log(4)
        assert a["moe_aux_loss"] >= 1.0 - 1e-6  # the Switch loss is 1 when balanced, above it otherwise
        for key in ("moe_load_max_over_mean", "moe_load_entropy", "moe_aux_loss_per_layer"):
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), atol=1e-3, rtol=0)
        assert a["moe_router_entropy"] == pytest.approx(b["moe_router_entropy"], abs=1e-6)
        assert a["moe_aux_loss"] == pytest.approx(b["moe_aux_loss"], abs=1e-6)
    print("routing at step 1:", ep1[0])


def test_pipeline_stages_report_every_layer(weights, tmp_path):
    """PP 2: each stage routes its two layers; both report all four, reduced over the pipeline."""
    first, last = run_on_ranks(W.train_ep, 2, 1, weights, 1, str(tmp_path), None, None, 2)
    assert first["routing"] == last["routing"]
    (figures,) = first["routing"]
    assert all(v >= 1.0 for v in figures["moe_load_max_over_mean"]) and len(figures["moe_load_entropy"]) == 4
    assert all(v >= 1.0 - 1e-6 for v in figures["moe_aux_loss_per_layer"])
    assert first["losses"] == last["losses"]


def test_load_balancing_loss_reaches_the_gradient():
    """With per-token loss scaling megatron adds coeff x tokens x the Switch loss of each layer to the
    backward (MoEAuxLossAutoScaler); the schedules then divide every gradient by the trained tokens. Here
    (no DDP) the last layer's router gradient with the loss on minus without it is exactly that term's
    gradient, recomputed from the router's input by the Switch formula."""
    coeff = 0.01
    (out,) = run_on_ranks(W.aux_loss_gradient, 1, coeff)
    weight = out["weight"].clone().requires_grad_(True)
    hidden = out["input"].reshape(-1, weight.shape[1])
    logits = hidden @ weight.t()
    tokens, experts, k = logits.shape[0], logits.shape[1], 2
    scores = torch.softmax(logits, dim=-1)
    chosen = torch.zeros_like(scores).scatter(1, torch.topk(logits, k, dim=1).indices, 1.0)
    fraction = chosen.sum(0) / (tokens * k)  # f_i: share of routed slots
    mean_prob = scores.sum(0) / tokens  # P_i
    switch = experts * (fraction * mean_prob).sum()
    (expected,) = torch.autograd.grad(coeff * tokens * switch, weight)
    got = out["with"] - out["without"]
    assert tokens == out["tokens"].numel()
    assert got.abs().max() > 1e-4, "the loss changes the router gradient"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_packed_equals_alone_under_expert_parallelism(weights):
    """Dropless routing: a token's experts do not depend on the row it is in (no capacity, no dropping)."""
    (single,) = run_on_ranks(W.packed_vs_alone_ep, 1, 1, weights)
    (ep2,) = [o for o in run_on_ranks(W.packed_vs_alone_ep, 2, 2, weights) if o is not None]
    for out in (single, ep2):
        cu = out["cu"].tolist()
        for i in range(len(cu) - 1):
            start, end = cu[i], cu[i + 1]
            n = end - start
            torch.testing.assert_close(
                out["packed_logits"][0, start:end], out["alone_logits"][i][0, :n], atol=ATOL, rtol=0
            )
            torch.testing.assert_close(
                out["packed_losses"][0, start:end], out["alone_losses"][i][0, :n], atol=ATOL, rtol=0
            )
    torch.testing.assert_close(ep2["packed_logits"], single["packed_logits"], atol=ATOL, rtol=0)
    assert not torch.allclose(single["alone_logits"][0][0, :10], single["alone_logits"][1][0, :10])
