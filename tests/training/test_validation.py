"""Validation during training on the demo's held-out split, through the driver as users run it: the
loss is logged (console, metrics.jsonl, curves) before the first step, every run.eval_interval steps and
at the end, one per source (the demo blend's two datasets) plus their total, and each equals the
single-process value under TP2 x PP2 and under DP2 (same weights, same rows: the whole split)."""

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sail_megatron.config import ConfigError
from sail_megatron.data.demo_dataset import write_demo_raw
from sail_megatron.data.prepare import prepare
from sail_megatron.training.startup import prepare_config
from tests.helpers.train_cli import ENV, printed_losses, train_command, valid_metrics

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny" / "demo.yaml"
SOURCES = ("captions", "sft")
"""The demo blend's datasets, each a validation source."""


def _valid_records(run_dir):
    """step -> the validation record (total and per-source losses and tokens)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "valid_loss" in r}


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
    # data.valid_path unset: the blend's datasets are the sources; the total weighs them by trained tokens.
    for record in _valid_records(run_dir).values():
        losses = [record[f"valid_loss/{name}"] for name in SOURCES]
        tokens = [record[f"valid_tokens/{name}"] for name in SOURCES]
        assert all(t > 0 for t in tokens) and sum(tokens) == record["valid_tokens"], record
        weighted = sum(loss * t for loss, t in zip(losses, tokens)) / sum(tokens)
        assert abs(weighted - record["valid_loss"]) <= 1e-9 * record["valid_loss"], record
        assert losses[0] != losses[1], record  # captions and conversations are scored apart
    for name in SOURCES:
        assert len(re.findall(rf"^ +{name} +\| loss [0-9.]+ \| [0-9,]+ tokens$", stdout, re.M)) == 3, stdout


# The parallel runs name the same two datasets in the other config forms: a list and a mapping.
@pytest.mark.parametrize(
    "layout,valid_path",
    [
        (dict(tp=2, pp=2), "[{demo}/captions, {demo}/sft]"),
        (dict(dp=2), "{{captions: {demo}/captions, sft: {demo}/sft}}"),
    ],
    ids=["tp2xpp2-list", "dp2-mapping"],
)
def test_validation_equals_the_single_process(demo, single, tmp_path, layout, valid_path):
    reference, _ = single
    run_dir = tmp_path / "run"
    valid_path = valid_path.format(demo=demo)
    _train(demo, run_dir, "run.train_steps=1", f"run.init_from={reference}", f"data.valid_path={valid_path}", **layout)
    got, want = _valid_records(run_dir)[0], _valid_records(reference)[2]
    for key in ("valid_loss", *(f"valid_loss/{name}" for name in SOURCES)):
        assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key]), (key, got, want)
    for key in ("valid_tokens", *(f"valid_tokens/{name}" for name in SOURCES)):
        assert got[key] == want[key], (key, got, want)


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
    # Several sources: the one without a val split is named, whatever the others hold.
    args.overrides.append(f"data.valid_path={{held_out: {demo / 'sft'}, unsplit: {plain}}}")
    with pytest.raises(ConfigError) as info:
        prepare_config(args, world_size=1)
    assert info.value.field == "data.valid_path.unsplit", info.value
    assert "validation source 'unsplit'" in str(info.value) and "no samples in its val split" in str(info.value)
    args.overrides.append(f"data.valid_path=[{demo / 'blend.yaml'}, {plain}]")
    with pytest.raises(ConfigError) as info:
        prepare_config(args, world_size=1)
    assert info.value.field == "data.valid_path[1]" and "validation source 'plain'" in str(info.value)


@dataclass
class _Row:
    loss_mask: torch.Tensor
    keys: list = field(default_factory=lambda: ["k"])
    spans: list = field(default_factory=lambda: [(0, 0, 4)])


def test_ranks_pad_to_the_same_count_and_keep_their_sources(monkeypatch):
    # This rank holds none of source 0's rows (its val split is smaller than the data-parallel size) and
    # two of source 1's; the other rank three of source 0's and one of source 1's: both run 4 micro-batches.
    from sail_megatron.data.valid_sources import ValidSource
    from sail_megatron.training import validation

    monkeypatch.setattr(validation, "gather_ints_over_data_parallel", lambda counts: [counts, [3, 1]])
    sources = [ValidSource("a", "a", "data.valid_path[0]"), ValidSource("b", "b", "data.valid_path[1]")]
    rows = validation._same_count_on_every_rank([[], [_Row(torch.ones(4)), _Row(torch.ones(4))]], sources)
    assert [source for source, _ in rows] == [1, 1, 1, 1]
    assert [row.loss_mask.sum().item() for _, row in rows] == [4, 4, 0, 0] and rows[-1][1].keys == []
    # A source no rank holds a row of is named.
    monkeypatch.setattr(validation, "gather_ints_over_data_parallel", lambda counts: [counts, [0, 1]])
    with pytest.raises(ConfigError) as info:
        validation._same_count_on_every_rank([[], [_Row(torch.ones(4))]], sources)
    assert info.value.field == "data.valid_path[0]" and "validation source 'a' (a) holds no samples" in str(info.value)
