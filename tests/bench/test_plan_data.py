"""The data `sail-bench plan` plans with: the means `sail-data prepare --recipe` measured for the recipe's
data.path (a blend of prepared folders, their reports written here by hand as prepare writes them), and
the synthetic assumption, with the reason, when there are none."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sail_megatron.bench.plan import plan
from sail_megatron.bench.plan.measured_data import measured_statistics, rescaled
from sail_megatron.bench.synthetic_rows import sft_like
from sail_megatron.config.train import load_train_config
from sail_megatron.data.statistics import REPORT_NAME, SECTION, TokenTally, report_section, token_statistics

ROOT = Path(__file__).resolve().parents[2]
SFT_2B = "examples/configs/sail-vl-2b/3-sft-knowledge.yaml"  # run.train_samples: 21M
# Per dataset: 2000 tokens and 6 tiles (1536 image tokens) per sample; the SFT-like assumption is 1098
# tokens, 2.78 tiles and 65% image tokens.
TOKENS, TILES = 2000, 6
COVERAGE = "measured by sail-data prepare --recipe on 3 of 4 datasets, 92.5% of the sampling weight"


def _prepared(folder: Path, samples: int = 0) -> Path:
    """A folder that passes as prepared (`.nv-meta`), with a report: measured when `samples`."""
    (folder / ".nv-meta").mkdir(parents=True)
    section = None
    if samples:
        tally = TokenTally(samples, samples * TOKENS, samples * TILES * 256, samples * TILES)
        section = report_section({"train": tally}, SFT_2B)
    (folder / REPORT_NAME).write_text(json.dumps({SECTION: section}))
    return folder


@pytest.fixture(scope="module")
def blend(tmp_path_factory) -> Path:
    """Four datasets, weights 30 : 30 : 32.5 : 7.5, the last prepared without --recipe."""
    root = tmp_path_factory.mktemp("measured")
    parts = [_prepared(root / f"part{i}", samples=100 * (i + 1)) for i in range(3)] + [_prepared(root / "bare")]
    weights = [30, 30, 32.5, 7.5]
    items = [{"path": p.name, "weight": w} for p, w in zip(parts, weights)]
    path = root / "blend.yaml"
    path.write_text(yaml.safe_dump({"__module__": "megatron.energon", "splits": {"train": {"blend": items}}}))
    return path


def _cfg(path, *overrides):
    return load_train_config(ROOT / SFT_2B, [f"data.path={path}", *overrides])


def test_measured_means_replace_the_assumption(blend):
    stats = token_statistics(blend)
    assert (stats.datasets, stats.datasets_measured, stats.weight_measured) == (4, 3, pytest.approx(0.925))
    measured, assumed = plan(_cfg(blend), 64), plan(load_train_config(ROOT / SFT_2B), 64)
    data = measured["data"]
    assert data["source"] == COVERAGE and data["measured"]["unmeasured"] == [str(blend.parent / "bare")]
    assert data["mean_tokens_per_sample"] == pytest.approx(TOKENS) and data["mean_tiles_per_sample"] == pytest.approx(
        TILES
    )
    assert data["image_token_fraction"] == pytest.approx(TILES * 256 / TOKENS)
    # A samples budget at the measured mean.
    assert measured["budget_tokens"] == 21e6 * TOKENS and "the measured mean of data.path" in measured["budget"]
    # The rows the FLOPs are counted over hold the measured tiles per token: more ViT work per token.
    per_token = data["mean_tiles_per_row"] / data["mean_tokens_per_row"]
    assert per_token == pytest.approx(TILES / TOKENS, rel=0.02)
    assert measured["vit_flops_share"] > assumed["vit_flops_share"] + 0.02  # 36% against 33%
    # --tokens-per-sample still converts the budget; the FLOPs stay measured.
    given = plan(_cfg(blend), 64, tokens_per_sample=1500)
    assert given["budget_tokens"] == 21e6 * 1500 and given["vit_flops_share"] == measured["vit_flops_share"]


def test_the_table_says_where_the_means_come_from(blend):
    run = subprocess.run(
        [sys.executable, "-m", "sail_megatron.bench", "plan", "--config", SFT_2B, "--gpus", "64", f"data.path={blend}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    line = next(line for line in run.stdout.splitlines() if line.startswith("data ("))
    assert line.startswith(f"data ({COVERAGE}): 2000 tokens and 6.00 tiles per sample, 77% image tokens, over 600")
    assert "SFT-like distribution" in line and "rescaled to these means" in line
    assert "x 2000 tokens per sample (the measured mean of data.path)" in run.stdout


def test_without_measurements_the_assumption_says_why(tmp_path):
    bare = _prepared(tmp_path / "bare")
    for path, reason in [
        ("/no/such/blend.yaml", "data.path /no/such/blend.yaml not found here"),
        (bare, f"data.path {bare} has no token statistics (prepared without `sail-data prepare --recipe`)"),
        (tmp_path, "data.path is not a prepared dataset or blend ("),
    ]:
        stats, why = measured_statistics(_cfg(path))
        assert stats is None and why.startswith(reason), why
        data = plan(_cfg(path), 64)["data"]
        assert data["source"] == f"assumed: {why}" and data["measured"] is None and data["kind"] == "SFT-like"
    (bare / REPORT_NAME).write_text("{")
    assert "no readable token statistics" in measured_statistics(_cfg(bare))[1]


def test_rescaling_keeps_the_shape_and_hits_the_means(blend):
    cfg = _cfg(blend)
    stats = token_statistics(blend)
    tokens, tiles = sft_like(4096, seed=0)
    new_tokens, new_tiles = rescaled(tokens, tiles, stats, cfg)
    assert new_tokens.mean() == pytest.approx(TOKENS, rel=2e-3) and new_tiles.mean() == pytest.approx(TILES, rel=2e-3)
    assert new_tokens.max() <= cfg.data.seq_length and new_tiles.max() <= cfg.data.max_tiles_per_pack
    assert np.all(new_tiles[tiles == 0] == 0)  # text-only samples stay text-only
