"""The GPU recipes' settings, trained on the CPU: every setting of the GPU recipes in examples/configs that
does not physically need a GPU (precision, distributed optimizer and its overlaps, recompute, per-part
lrs, schedules, freezing per stage, packing, chat template) runs on a tiny model of the same family on
2 processes through a stage chain with `run.init_from`: SAIL-VL-1.6's three refinement stages
(projector, + vision encoder, everything) on the tiny AIMv2 model, SAIL-VL-2B's last two SFT stages on the
tiny InternViT model, SAIL-VL2-MoE's stages 2-4 on the tiny mixture-of-experts model with its experts
split over both processes. Every stage left out of a chain sets what a chained stage sets, differing only in
learning rates (tested below). A setting added to a recipe is carried here automatically; only the keys
below are replaced, each for a stated reason."""

import copy
import json
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from sail_megatron.config.train import _read_recipe, resolve
from sail_megatron.training.run_dir import KEEP_FILE
from tests.helpers.train_cli import last_record, run_train

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
STAGES = ["1-pretrain-alignment", "2-pretrain-advance", "3-sft-knowledge", "4-sft-instruction", "5-sft-preference"]
NPROC = 2
STEPS = 2
# GPU recipe family -> (the tiny preset standing in for it, the stages chained on the CPU). The 8B and
# SAIL-VL-1.5 recipes carry the same CPU settings as these (tested below), so they are not run again.
# SAIL-VL-2B's pretraining stages count tokens (SAIL-VL-1.6's count samples and steps) and its SFT stages
# set the same as each other but for learning rates (tested below), so its chain is stages 1, 2 and 5.
# The MoE recipes run a frozen language model (the router's balancing loss reaching no trained weight), then a
# training one with full recomputation, without and with a ViT learning rate of its own (stage 1 sets what
# stage 2 does, less the ViT; stage 5 what stage 4 does).
CHAINS = {
    "sail-vl-2b": ("tiny", STAGES[:2] + STAGES[4:]),
    "sail-vl-1.6-8b": ("tiny-aimv2", STAGES[:3]),
    "sail-vl2-moe": ("tiny-sail-vl2-moe", STAGES[1:4]),
}
# A budget in tokens or samples a short run reaches at about step STEPS: one step holds at most
# 2 x NPROC rows of 512 tokens (so 1.1 rows' worth per row and step takes two steps); the demo's SFT rows
# hold 2-4 samples. The stop rule itself is checked on what the run consumed.
BUDGETS = {"tokens": int(STEPS * 2 * NPROC * 512 * 0.55), "samples": 16}
SCALE_POINTS = "log2:1K"
SAME_CPU_SETTINGS = {"sail-vl-8b": "sail-vl-2b", "sail-vl-1.5-2b": "sail-vl-1.6-8b"}
# Values that select no code path: a stage left out of a chain may differ from a chained one in these.
RATES = {"optim.lr", "optim.min_lr", "optim.vision_lr", "optim.warmup_fraction", "optim.wsd_decay_fraction"}

# Replaced keys (dotted; a trailing ".*" covers a section) and why they cannot carry over.
REPLACED = {
    "model_preset": "the tiny model stands in for the 2B/8B shapes",
    "model.*": "the tiny model stands in for the 2B/8B shapes",
    "parallel.tensor_model_parallel_size": "2 processes run data parallel, so the optimizer shards over DP=2",
    "parallel.pipeline_model_parallel_size": "2 processes run data parallel, so the optimizer shards over DP=2",
    "parallel.expert_model_parallel_size": "the tiny MoE model's experts split over the 2 processes (EP=2)",
    "parallel.sequence_parallel": "needs Transformer Engine layers (GPU only; local norms refuse it)",
    "parallel.vision_parallel": "one TP rank here, where the ViT is whole either way (both layouts train at TP=2 in "
    "tests/parallel/test_vision_layout.py and through the CLI in tests/training/test_train_driver.py)",
    "precision.layers": "Transformer Engine layers need a GPU",
    "precision.fp8": "FP8 needs Transformer Engine on a GPU",
    "precision.fp8_vision": "FP8 needs Transformer Engine on a GPU",
    "data.path": "the embedded demo dataset",
    "data.tokenizer": "the demo tokenizer",
    "data.seq_length": "rows sized for the tiny model",
    "data.num_workers": "two CPU cores",
    "run.train_steps": "a few steps per stage",
    "run.train_tokens": "a few steps' worth of tokens (the budget's unit, and so the schedule's, is kept)",
    "run.train_samples": "a few steps' worth of samples (the budget's unit, and so the schedule's, is kept)",
    "run.save_at_tokens": "scaling-curve points a short run reaches (doublings stay doublings)",
    "run.save_interval": "a few steps per stage",
    "run.save_dir": "a temporary folder",
    "run.init_from": "the previous stage of this chain",
    "run.global_batch_size": "2 micro-batches per rank per step: gradient accumulation kept, size cut",
    "run.peak_tflops": "no GPU peak on the CPU",
    "optim.warmup_steps": "schedule lengths scaled to the run (the schedule's kind is kept)",
    "optim.decay_steps": "schedule lengths scaled to the run (the schedule's kind is kept)",
    "optim.wsd_decay_steps": "schedule lengths scaled to the run (the schedule's kind is kept)",
}


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _replaced(key: str) -> bool:
    return key in REPLACED or any(r.endswith(".*") and key.startswith(r[:-1]) for r in REPLACED)


def _set(d: Dict[str, Any], key: str, value) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _drop(d: Dict[str, Any], key: str) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.get(p, {})
    d.pop(leaf, None)


def cpu_recipe(recipe: Path, demo: Path, save_dir: Path, init_from, preset: str = "tiny") -> Dict[str, Any]:
    """The recipe with only the REPLACED keys changed."""
    raw = _read_recipe(recipe)
    out = copy.deepcopy(raw)
    for key in list(_flat(raw)):
        if _replaced(key):
            _drop(out, key)
    out.pop("model", None)
    tiny = _read_recipe(CONFIGS / "tiny" / "_base.yaml")
    schedule = raw.get("optim", {}).get("schedule", "cosine")
    values = {
        "model_preset": preset,
        "model.language.vocab_size": tiny["model"]["language"]["vocab_size"],
        "parallel.tensor_model_parallel_size": 1,
        "parallel.pipeline_model_parallel_size": 1,
        "data.path": str(demo / ("captions" if "pretrain" in recipe.name else "sft")),
        "data.tokenizer": str(demo / "raw" / "tokenizer"),
        "data.seq_length": tiny["data"]["seq_length"],
        "data.num_workers": 1,
        "run.save_interval": STEPS,
        "run.save_dir": str(save_dir),
        "run.init_from": str(init_from) if init_from else None,
        "run.global_batch_size": 2 * NPROC,
        **_budget(raw, schedule),
        **(
            {"parallel.expert_model_parallel_size": NPROC}
            if _flat(raw).get("parallel.expert_model_parallel_size")
            else {}
        ),
    }
    for key, value in values.items():
        _set(out, key, value)
    return out


def _budget(raw: Dict[str, Any], schedule: str) -> Dict[str, Any]:
    """The recipe's budget, shortened in its own unit (a steps budget's schedule lengths with it)."""
    run = raw.get("run", {})
    out: Dict[str, Any] = {"run.save_at_tokens": SCALE_POINTS} if run.get("save_at_tokens") else {}
    for unit, amount in BUDGETS.items():
        if run.get(f"train_{unit}") is not None:
            return {**out, f"run.train_{unit}": amount}
    return {
        **out,
        "run.train_steps": STEPS,
        "optim.warmup_steps": 1,
        "optim.decay_steps": STEPS + 2,
        **({"optim.wsd_decay_steps": 1} if schedule == "wsd" else {}),
    }


def _check_budget(run_dir: Path, config: Dict[str, Any]) -> None:
    """The stage stopped at the first step reaching its budget; scaling-curve checkpoints were kept."""
    records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    run = config["run"]
    unit = next(u for u in ("steps", "tokens", "samples") if run.get(f"train_{u}") is not None)
    reached = [r["step"] if unit == "steps" else r[f"consumed_{unit}"] for r in records]
    assert reached[-1] >= run[f"train_{unit}"] and (len(reached) == 1 or reached[-2] < run[f"train_{unit}"]), reached
    kept = sorted(p.parent.name for p in run_dir.glob(f"iter_*/{KEEP_FILE}"))
    if run.get("save_at_tokens"):
        assert kept and all((run_dir / k).is_dir() for k in kept), kept
    else:
        assert not kept


def carried_settings(recipe: Path) -> Dict[str, Any]:
    return {k: v for k, v in _flat(_read_recipe(recipe)).items() if not _replaced(k)}


@pytest.mark.parametrize("family,chained", sorted(SAME_CPU_SETTINGS.items()))
def test_recipes_not_chained_carry_the_cpu_settings_of_a_chained_family(family, chained):
    # They differ only in layout and shape, so one chain covers both; if they ever diverge, this says
    # so and the chain below must run their settings as well.
    for stage in STAGES:
        assert carried_settings(CONFIGS / family / f"{stage}.yaml") == carried_settings(
            CONFIGS / chained / f"{stage}.yaml"
        ), stage


def _code_paths(settings: Dict[str, Any], recipe: Path) -> Dict[str, Any]:
    """A stage's carried settings with the rates' values left out (their keys stay: a rate set or not,
    such as a separate vision lr, is a path of its own), plus what the replaced keys choose: the budget's
    unit (the schedule runs in it) and whether scaling-curve checkpoints are kept."""
    raw = _flat(_read_recipe(recipe))
    paths = {k: ("<rate>" if k in RATES else v) for k, v in settings.items()}
    paths["<budget unit>"] = next(u for u in ("steps", "tokens", "samples") if raw.get(f"run.train_{u}") is not None)
    paths["<save_at_tokens>"] = raw.get("run.save_at_tokens") is not None
    return paths


@pytest.mark.parametrize("family", sorted(CHAINS))
def test_every_stage_left_out_of_a_chain_runs_what_a_chained_stage_runs(family):
    chained = [
        _code_paths(carried_settings(CONFIGS / f / f"{stage}.yaml"), CONFIGS / f / f"{stage}.yaml")
        for f, (_, stages) in CHAINS.items()
        for stage in stages
    ]
    for stage in STAGES:
        recipe = CONFIGS / family / f"{stage}.yaml"
        assert _code_paths(carried_settings(recipe), recipe) in chained, stage


@pytest.mark.parametrize("family", sorted(CHAINS))
def test_cpu_recipes_keep_every_gpu_setting(tmp_path, family):
    preset, _ = CHAINS[family]
    for stage in STAGES:
        recipe = CONFIGS / family / f"{stage}.yaml"
        cpu = _flat(cpu_recipe(recipe, tmp_path, tmp_path, None, preset))
        for key, value in carried_settings(recipe).items():
            assert cpu[key] == value, key
        resolve(cpu_recipe(recipe, tmp_path, tmp_path, None, preset))  # loads as a TrainConfig


@pytest.mark.parametrize("family", sorted(CHAINS))
def test_gpu_recipe_stage_chain_trains_on_the_cpu(demo, tmp_path, family):
    preset, stages = CHAINS[family]
    previous, last_loss = None, None
    for i, stage in enumerate(stages):
        run_dir = tmp_path / stage
        config = tmp_path / f"{stage}.yaml"
        recipe = cpu_recipe(CONFIGS / family / f"{stage}.yaml", demo, run_dir, previous, preset)
        config.write_text(yaml.safe_dump(recipe, sort_keys=False))
        losses, log = run_train(config, [], nproc=NPROC)
        assert 1 <= len(losses) <= 2 * STEPS and ("initialized from" in log) == bool(previous), log[-3000:]
        _check_budget(run_dir, recipe)
        assert "Mismatch dtype" not in log and "Traceback" not in log  # every weight in the training dtype
        assert "already been dispatched" not in log  # parameter all-gathers run in forward order
        if last_loss is not None:  # the loaded weights are the ones trained (and saved) just before
            assert abs(losses[0] - last_loss) < 0.5, (stage, losses, last_loss)
        assert list(run_dir.glob("tensorboard/events.out.tfevents.*")) and (run_dir / "curves.png").stat().st_size
        assert (run_dir / "latest").is_file()
        previous, last_loss = run_dir, losses[-1]
    assert f"model_preset: {preset}" in (tmp_path / stages[-1] / "config.yaml").read_text()
    record = last_record(tmp_path / stages[-1])
    for key in (
        "loss",
        "lr_vision",
        "lr_projector",
        "lr_language",
        "grad_norm",
        "tokens_per_s",
        "tflops_per_s",
        "packing_utilization",
        "data_wait_frac",
        "memory_gib",
        "skipped_samples",
        "eta_s",
    ):
        assert record[key] is not None, key
    if family == "sail-vl-2b":
        assert record["lr_vision"] < record["lr_language"]  # the SFT recipes train the ViT 10x slower
    assert 0 < record["packing_utilization"] <= 1 and record["tflops_per_s"] > 0
