"""Per-part learning rates, the lr schedules, activation recompute and non-finite steps."""

import math

import pytest
import torch

from sail_megatron.config.budget import Budget
from sail_megatron.config.lr_schedule import resolve_lr_schedule
from sail_megatron.config.optim import OptimConfig
from sail_megatron.training.optimizer import build_scheduler, part_learning_rates
from tests.helpers.multiprocess import run_on_ranks
from tests.training import workers


class _Groups:
    """Just what megatron's scheduler touches: param groups with their own max/min lr."""

    def __init__(self, optim: OptimConfig):
        self.param_groups = [
            {"max_lr": lr, "min_lr": optim.min_lr * lr / optim.lr, "params": []} for lr in optim.part_lrs().values()
        ]


def _curve(optim: OptimConfig, steps: int, budget: Budget = Budget("steps", 1000), increment: int = 1):
    scheduler = build_scheduler(_Groups(optim), optim, resolve_lr_schedule(optim, budget))
    out = []
    for _ in range(steps):
        scheduler.step(increment)
        out.append(part_learning_rates(scheduler, optim))
    return out


def test_warmup_stable_decay():
    optim = OptimConfig(lr=1.0, min_lr=0.1, schedule="wsd", warmup_steps=4, decay_steps=20, wsd_decay_steps=5)
    lrs = [r["language"] for r in _curve(optim, 22)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warmup
    assert lrs[4:15] == pytest.approx([1.0] * 11)  # stable until decay_steps - wsd_decay_steps = 15
    assert lrs[15:20] == pytest.approx([1.0 - 0.9 * k / 5 for k in range(1, 6)])  # linear anneal to min_lr
    assert lrs[20:] == pytest.approx([0.1, 0.1])


def test_cosine_and_per_part_lrs_share_the_shape():
    optim = OptimConfig(lr=1e-3, min_lr=1e-5, vision_lr=1e-4, warmup_steps=2, decay_steps=12)
    curve = _curve(optim, 14)
    for r in curve:
        assert r["vision"] == pytest.approx(r["language"] / 10) and r["projector"] == r["language"]
    middle = curve[6]["language"]  # step 7: half-way through the cosine
    assert middle == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert curve[-1]["vision"] == pytest.approx(1e-6)


def test_a_token_budget_runs_the_schedule_in_tokens():
    """The same curve as a steps budget of 20 when each step consumes 1,000 tokens of a 20K budget."""
    fractions = dict(warmup_fraction=0.2, wsd_decay_fraction=0.25)
    by_tokens = _curve(
        OptimConfig(lr=1.0, min_lr=0.1, schedule="wsd", **fractions), 22, Budget("tokens", 20_000), increment=1000
    )
    by_steps = _curve(OptimConfig(lr=1.0, min_lr=0.1, schedule="wsd", **fractions), 22, Budget("steps", 20))
    assert [r["language"] for r in by_tokens] == pytest.approx([r["language"] for r in by_steps])
    assert by_steps[3]["language"] == pytest.approx(1.0) and by_steps[19]["language"] == pytest.approx(0.1)


def test_part_lrs_land_in_their_groups_and_survive_a_resume(tmp_path):
    (r,) = run_on_ranks(workers.part_lrs_survive_resume, 1, str(tmp_path))
    assert r["by_part"]["in_vision_lr_groups"] == r["by_part"]["vision_params"] > 0
    assert r["by_part"]["max_lrs"] == [1e-4, 1e-3]
    assert r["after"] == r["before"]


@pytest.fixture(scope="module")
def no_recompute():
    (r,) = run_on_ranks(workers.recompute_run, 1, None)
    return r


@pytest.mark.parametrize(
    "granularity,method,layers,vision",
    [("selective", "uniform", 1, False), ("full", "uniform", 2, True), ("full", "block", 1, False)],
)
def test_recompute_gives_the_same_loss_and_gradients(no_recompute, granularity, method, layers, vision):
    (r,) = run_on_ranks(workers.recompute_run, 1, granularity, method, layers, vision)
    assert r["loss"] == pytest.approx(no_recompute["loss"], abs=1e-6)
    for name, g in no_recompute["grads"].items():
        torch.testing.assert_close(r["grads"][name], g, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_nonfinite_step_is_skipped_without_touching_weights_or_schedule():
    (r,) = run_on_ranks(workers.nonfinite_step_is_skipped, 1)
    assert not r["ok"] and r["bad"] and math.isnan(r["bad_loss"])
    assert r["unchanged"] and not r["scheduler_moved"]
