"""Training under data parallelism with the distributed optimizer, and freezing by stage."""

import torch

from tests.helpers.multiprocess import run_on_ranks
from tests.parallel import workers


def test_dp2_distributed_optimizer_matches_dp1():
    # Same global batch: DP=1 runs 2 micro-batches per step, DP=2 one each.
    (single,) = run_on_ranks(workers.train_steps, 1, 3, 2)
    dp = run_on_ranks(workers.train_steps, 2, 3, 1)
    # The per-token loss reduction is the same sum in another order: tiny float differences only.
    torch.testing.assert_close(torch.tensor(dp[0]["losses"]), torch.tensor(single["losses"]), atol=1e-5, rtol=0)
    for rank_result in dp:
        for name, w in single["final"].items():
            torch.testing.assert_close(rank_result["final"][name], w, atol=2e-5, rtol=0, msg=lambda m: f"{name}: {m}")
    moved = [n for n, w in single["final"].items() if not torch.equal(w, single["initial"][n])]
    assert len(moved) == len(single["final"]), "every parameter trains in this run"


def test_freezing_keeps_frozen_parts_bit_identical():
    results = run_on_ranks(workers.train_steps, 2, 2, 1, ["projector"])
    for r in results:
        assert r["trained"] == {n for n in r["final"] if n.startswith("projector.")}
        for name, w in r["final"].items():
            if name.startswith("projector."):
                assert not torch.equal(w, r["initial"][name]), f"{name} should have trained"
            else:
                assert torch.equal(w, r["initial"][name]), f"frozen {name} changed"


def test_freezing_under_pipeline_with_untrained_stage():
    # Pretrain-alignment on TP=2 x PP=2: the second stage holds no trainable parameter at all.
    results = run_on_ranks(workers.train_steps, 4, 2, 2, ["projector"], 2, 2)
    for r in results:
        for name, w in r["final"].items():
            assert torch.equal(w, r["initial"][name]) != name.startswith("projector."), name


def test_tied_embeddings_stay_one_weight_under_pipeline_training():
    # AIMv2 + Qwen3 with tied embeddings (as Qwen3-1.7B): under PP=2 the first stage's embedding and the last
    # stage's output layer are copies of one weight. Each stage's update must use the sum of both gradients
    # (megatron's finalize_model_grads), or the copies drift apart from the first step; the gradients
    # themselves are compared with the single process in test_layouts.py.
    first, last = run_on_ranks(workers.train_steps, 2, 3, 2, None, 1, 2, "tiny-sail-vl2")
    embedding = first["final"]["language_model.embedding.word_embeddings.weight"]
    output = last["final"]["language_model.output_layer.weight"]
    assert not torch.equal(embedding, first["initial"]["language_model.embedding.word_embeddings.weight"])
    torch.testing.assert_close(output, embedding, atol=1e-6, rtol=0)
