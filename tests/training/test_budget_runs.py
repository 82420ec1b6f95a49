"""Stage budgets through the trainer's CLI on the tiny model: a stage in tokens stops at the first step
reaching its budget, keeps its scaling-curve checkpoints past `keep_last`, carries its consumed counts in
metrics.jsonl, the console and its checkpoints, resumes them exactly under another data-parallel size
(with a longer budget, which lengthens the lr schedule), refuses a change of unit, and each kept
checkpoint exports for evaluation."""

import json
import subprocess
import sys
from pathlib import Path

from megatron.core import dist_checkpointing

from sail_megatron.training.run_dir import KEEP_FILE
from tests.helpers.train_cli import ENV, run_train

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"

FIRST, SECOND = 4000, 12000  # tokens: about 2 and 6 steps of 4 rows x 512 tokens
TOKENS_BUDGET = (
    "parallel.tensor_model_parallel_size=1",
    "parallel.pipeline_model_parallel_size=1",
    "run.train_steps=null",
    "optim.warmup_steps=null",
    "optim.decay_steps=null",
    "optim.warmup_fraction=0.25",
    "run.eval_interval=0",
    "run.save_interval=100",
    "run.keep_last=1",
    "run.plot=false",
    "run.save_at_tokens=[1K, 2K]",
)


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def _common(checkpoint):
    return dist_checkpointing.load_common_state_dict(str(checkpoint))["common"]


def _stopped_at_the_budget(records, budget):
    tokens = [r["consumed_tokens"] for r in records]
    assert tokens[-1] >= budget and tokens[-2] < budget, tokens


def test_a_token_budget_stops_keeps_resumes_and_exports(demo, tmp_path):
    recipe, run = CONFIGS / "tiny" / "demo.yaml", tmp_path / "run"
    data = (f"data.path={demo / 'blend.yaml'}", f"data.tokenizer={demo / 'raw' / 'tokenizer'}")
    base = (*TOKENS_BUDGET, *data, f"run.save_dir={run}")

    # Two data-parallel ranks, budget FIRST tokens.
    _, log = run_train(recipe, [*base, f"run.train_tokens={FIRST}"], nproc=2)
    first = _records(run)
    _stopped_at_the_budget(first, FIRST)
    assert first[-1]["budget_fraction"] == 1.0 and "reached the budget" in log
    assert f"/{FIRST // 1000}K (" in log  # the console shows tokens against the budget
    last = run / f"iter_{first[-1]['step']:08d}"
    assert (run / "latest").read_text().strip() == last.name
    saved = _common(last)
    assert saved["consumed_tokens"] == first[-1]["consumed_tokens"]
    assert saved["consumed_samples"] == first[-1]["consumed_samples"] and saved["lr_schedule_unit"] == "tokens"
    # The 1K and 2K points: kept (with why) although keep_last is 1; nothing else older than the last.
    kept = sorted(p.parent for p in run.glob(f"iter_*/{KEEP_FILE}"))
    assert kept and set(run.glob("iter_*")) == {*kept, last}, sorted(run.glob("iter_*"))
    assert "reached 1K" in (kept[0] / KEEP_FILE).read_text()
    for k in kept:
        assert _common(k)["consumed_tokens"] >= 1000

    # Resumed on one rank (another data-parallel size) with a longer budget: the counts go on exactly,
    # and the schedule follows the new budget (logged).
    _, log = run_train(recipe, [*base, f"run.train_tokens={SECOND}"], nproc=1)
    records = _records(run)
    resumed = records[len(first) :]
    assert resumed[0]["step"] == first[-1]["step"] + 1
    step_tokens = round(resumed[0]["tokens_per_s"] * resumed[0]["step_time_s"])
    assert resumed[0]["consumed_tokens"] == first[-1]["consumed_tokens"] + step_tokens
    _stopped_at_the_budget(records, SECOND)
    assert f"decay: {FIRST} -> {SECOND}" in log, log[-3000:]
    # The first run ended its decay at min_lr; the longer budget's decay puts the lr back above it.
    assert first[-1]["lr"] == 3e-4 < resumed[0]["lr"]

    # A change of unit is refused, naming the field and the fix.
    _, log = run_train(recipe, [*base, "run.train_samples=1K"], nproc=1, expect_rc=1)
    assert "run.train_samples: the run's checkpoints count the lr schedule in tokens" in log, log[-3000:]

    # A kept checkpoint exports as a transformers folder (for evaluating the scaling curve).
    export = tmp_path / "hf"
    convert = subprocess.run(
        [sys.executable, "-m", "sail_megatron.convert.cli", "mcore-to-hf", "--ckpt", str(kept[0])]
        + ["--out", str(export), "--format", "transformers"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert convert.returncode == 0, convert.stderr[-3000:]
    # What loading and generating from such a folder gives is tested in tests/convert/test_to_transformers.py.
    assert (export / "config.json").is_file() and list(export.glob("*.safetensors"))
