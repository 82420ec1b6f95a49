"""Validation during training on the demo's held-out split, through the driver as users run it: the
loss is logged (console, metrics.jsonl, curves) before the first step, every run.eval_interval steps and
at the end, and equals the single-process value under TP2 x PP2 and under DP2 (same weights, same rows:
the whole split)."""

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from sail_megatron.config import ConfigError
from sail_megatron.data.demo_dataset import write_demo_raw
from sail_megatron.data.prepare import prepare
from sail_megatron.training.startup import prepare_config
from tests.helpers.train_cli import ENV, printed_losses, train_command, valid_metrics

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny" / "demo.yaml"


def _overrides(demo, run_dir, *extra, tp=1, pp=1, dp=1):
    return [
        f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}",
        f"data.tokenizer={demo / 'raw' / 'tokenizer'}",
        f"data.path={demo / 'blend.yaml'}",
        f"run.save_dir={run_dir}",
        f"run.global_batch_size={2 * dp}",
        "run.eval_interval=1",
        "run.eval_steps=0",
        "run.log_interval=1",
        *extra,
    ]


def _train(demo, run_dir, *extra, tp=1, pp=1, dp=1):
    nproc = tp * pp * dp
    out = subprocess.run(
        train_command(DEMO_RECIPE, _overrides(demo, run_dir, *extra, tp=tp, pp=pp, dp=dp), nproc),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout


@pytest.fixture(scope="module")
def single(demo, tmp_path_factory):
    """Two steps in one process (the first at warmup's lr 0), validated before and after each; its
    checkpoint holds the weights the parallel layouts validate at their step 0."""
    run_dir = tmp_path_factory.mktemp("single")
    stdout = _train(demo, run_dir, "run.train_steps=2")
    return run_dir, stdout


def test_validation_is_logged_and_drawn(single):
    run_dir, stdout = single
    valid = valid_metrics(run_dir)
    assert sorted(valid) == [0, 1, 2] and valid[2] < valid[0], valid  # a step on the demo data helps
    assert stdout.count("validation at step") == 3 and len(printed_losses(stdout)) == 2
    assert (run_dir / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("layout", [dict(tp=2, pp=2), dict(dp=2)], ids=["tp2xpp2", "dp2"])
def test_validation_equals_the_single_process(demo, single, tmp_path, layout):
    reference, _ = single
    run_dir = tmp_path / "run"
    _train(demo, run_dir, "run.train_steps=1", f"run.init_from={reference}", **layout)
    got, want = valid_metrics(run_dir)[0], valid_metrics(reference)[2]
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)


def test_a_dataset_without_a_val_split_is_refused_before_training(demo, tmp_path):
    raw = write_demo_raw(tmp_path / "raw")
    plain = tmp_path / "plain"
    prepare(raw.captions_jsonl, raw.images_dir, plain, fmt="caption", shard_size=16, progress=False)
    args = SimpleNamespace(config=str(DEMO_RECIPE), overrides=_overrides(demo, tmp_path / "r", f"data.path={plain}"))
    with pytest.raises(ConfigError) as info:
        prepare_config(args, world_size=1)
    assert info.value.field == "data.path" and "no samples in its val split" in str(info.value)
    assert "--valid-fraction" in str(info.value)
    args.overrides.append(f"data.valid_path={demo / 'sft'}")  # another folder's held-out split will do
    prepare_config(args, world_size=1)
