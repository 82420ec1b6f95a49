"""Stage budgets in steps, tokens or samples; the lr schedule in the budget's unit; scaling-curve points;
and the GPU recipes carrying the paper's budgets."""

from pathlib import Path

import pytest

from sail_megatron.config import ConfigError
from sail_megatron.config.budget import Budget, ScalePoints, scale_points
from sail_megatron.config.counts import format_count, parse_count
from sail_megatron.config.lr_schedule import LrSchedule
from sail_megatron.config.train import load_train_config

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
TINY = CONFIGS / "tiny" / "2-pretrain-advance.yaml"

# The SAIL-VL paper's budgets (arXiv 2501.05952): SAIL-VL-2B pretrains on 131B + 524B tokens, then SFT on
# 21M, 12M and 3.5M samples; SAIL-VL-8B pretrains on 52B tokens, split here 1:4 as the 2B's stages are.
PAPER = {
    "sail-vl-2b/1-pretrain-alignment": ("tokens", 131 * 10**9),
    "sail-vl-2b/2-pretrain-advance": ("tokens", 524 * 10**9),
    "sail-vl-8b/1-pretrain-alignment": ("tokens", 10_400_000_000),
    "sail-vl-8b/2-pretrain-advance": ("tokens", 41_600_000_000),
    # SAILViT's report: 8M samples for its adapter warm-up, 36.5M for joint refinement; its feature
    # refinement stage has no published size (a steps placeholder, said so in the recipe).
    "sail-vl-1.5-2b/1-pretrain-alignment": ("samples", 8_000_000),
    "sail-vl-1.5-2b/2-pretrain-advance": ("steps", 100_000),
    "sail-vl-1.5-2b/3-sft-knowledge": ("samples", 36_500_000),
    "sail-vl-1.6-8b/1-pretrain-alignment": ("samples", 8_000_000),
    "sail-vl-1.6-8b/2-pretrain-advance": ("steps", 100_000),
    "sail-vl-1.6-8b/3-sft-knowledge": ("samples", 36_500_000),
    "sail-vl2-moe/1-pretrain-alignment": ("samples", 8_000_000),
    "sail-vl2-moe/2-pretrain-advance": ("steps", 100_000),
    "sail-vl2-moe/3-sft-knowledge": ("samples", 36_500_000),
}
for _family in ("sail-vl-2b", "sail-vl-8b", "sail-vl-1.5-2b", "sail-vl-1.6-8b", "sail-vl2-moe"):
    PAPER.setdefault(f"{_family}/3-sft-knowledge", ("samples", 21_000_000))
    PAPER[f"{_family}/4-sft-instruction"] = ("samples", 12_000_000)
    PAPER[f"{_family}/5-sft-preference"] = ("samples", 3_500_000)


@pytest.mark.parametrize("stage", sorted(PAPER))
def test_gpu_recipes_carry_the_paper_budgets(stage):
    cfg = load_train_config(CONFIGS / f"{stage}.yaml")
    assert cfg.run.budget() == Budget(*PAPER[stage])
    cfg.validate(world_size=256, has_cuda=True, has_te=True, needs_data=False)
    schedule = cfg.lr_schedule()
    assert schedule.unit == PAPER[stage][0] and schedule.decay == cfg.run.budget().amount


def test_the_8b_pretraining_budget_is_52b_split_one_to_four():
    first, second = (
        load_train_config(CONFIGS / "sail-vl-8b" / f"{s}.yaml").run.train_tokens
        for s in ("1-pretrain-alignment", "2-pretrain-advance")
    )
    assert first + second == 52 * 10**9 and second == 4 * first


def test_the_2b_pretraining_keeps_a_scaling_curve():
    cfg = load_train_config(CONFIGS / "sail-vl-2b" / "2-pretrain-advance.yaml")
    points = scale_points(cfg.run.save_at_tokens)
    kept = points.crossed(0, cfg.run.train_tokens)
    assert kept[0] == 10**9 and kept[-1] == 2**9 * 10**9 and len(kept) == 10  # 1B .. 512B


@pytest.mark.parametrize(
    "text,value",
    [("131B", 131 * 10**9), ("3.5M", 3_500_000), ("21m", 21_000_000), ("52e9", 52 * 10**9), ("1_000", 1000), (7, 7)],
)
def test_counts_take_suffixes(text, value):
    assert parse_count(text, "run.train_tokens") == value


@pytest.mark.parametrize("text", ["1.5", "-3", "0", "ten", "1.2345K", True, 2.5])
def test_counts_refuse_what_is_not_a_whole_positive_number(text):
    with pytest.raises(ConfigError) as e:
        parse_count(text, "run.train_samples")
    assert e.value.field == "run.train_samples" and "131B" in str(e.value)


def test_format_count():
    assert [format_count(n) for n in (131 * 10**9, 3_500_000, 999, 41_600_000_000)] == ["131B", "3.5M", "999", "41.6B"]


def test_a_recipe_budget_in_tokens_resolves_with_its_schedule():
    cfg = load_train_config(
        TINY,
        [
            "run.train_steps=null",
            "run.train_tokens=2M",
            "optim.warmup_steps=null",
            "optim.decay_steps=null",
            "optim.wsd_decay_steps=null",
            "optim.warmup_fraction=0.01",
            "optim.wsd_decay_fraction=0.1",
        ],
    )
    cfg.validate(world_size=4, has_cuda=False, has_te=False)
    assert cfg.run.budget() == Budget("tokens", 2_000_000)
    assert cfg.lr_schedule() == LrSchedule("tokens", 20_000, 2_000_000, 200_000)


@pytest.mark.parametrize(
    "overrides,field,says",
    [
        (["run.train_tokens=1M"], "run.train_steps", "run.train_steps=20, run.train_tokens=1000000"),
        (["run.train_steps=null"], "run.train_steps", "none of them"),
        (["run.train_steps=null", "run.train_samples=1K"], "optim.warmup_steps", "optim.warmup_fraction"),
        (
            ["run.train_steps=null", "run.train_tokens=1K", "optim.warmup_steps=null", "optim.decay_steps=null"],
            "optim.wsd_decay_steps",
            "run.train_tokens",
        ),
        (["optim.warmup_fraction=0.1"], "optim.warmup_steps", "optim.warmup_fraction"),
        (["optim.warmup_steps=null", "optim.warmup_fraction=1.5"], "optim.warmup_fraction", "[0, 1]"),
        (["optim.decay_steps=2"], "optim.decay_steps", "warmup"),
        (["run.train_tokens=lots", "run.train_steps=null"], "run.train_tokens", "131B"),
        (["run.save_at_tokens=log3"], "run.save_at_tokens", "log2"),
        (["run.save_at_tokens=[1B, x]"], "run.save_at_tokens[1]", "131B"),
    ],
)
def test_budget_errors_name_the_field_and_the_fix(overrides, field, says):
    with pytest.raises(ConfigError) as e:
        load_train_config(TINY, overrides).validate(world_size=4, has_cuda=False, has_te=False)
    assert e.value.field == field and says in str(e.value), str(e.value)


def test_scale_points():
    assert scale_points(None).crossed(0, 10**12) == []
    assert scale_points(["2K", 1000]).crossed(999, 2000) == [1000, 2000]
    doubling = scale_points("log2:1K")
    assert doubling.crossed(0, 4500) == [1000, 2000, 4000] and doubling.crossed(4000, 7999) == []
    assert scale_points("log2") == ScalePoints(doubling_from=10**9)
