"""The expert-load figures of training/moe_metrics.py from tokens per expert (the collective part runs in
tests/parallel/test_moe.py)."""

import math

import pytest
import torch

from sail_megatron.training.moe_metrics import _load_figures


def test_load_figures_per_layer():
    load = torch.tensor([[3.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    out = _load_figures(load, 4)
    # Layer 0: 4 routed slots over 4 experts -> mean 1, max 3; two experts idle. Layer 2 saw no token.
    assert out["moe_load_max_over_mean"] == [3.0, 1.0, 0.0]
    assert out["moe_load_max_over_mean_worst"] == 3.0
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    assert out["moe_load_entropy"] == [pytest.approx(entropy, abs=1e-4), 1.0, 0.0]
    assert out["moe_dead_experts"] == 2  # a layer without tokens has none "dead"
