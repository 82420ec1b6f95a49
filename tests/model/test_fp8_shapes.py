"""Every GEMM the ViT and projector run in FP8 gets a token count Hopper accepts (16 per tensor, 32 MXFP8),
for every preset, every recipe and any tile count, with less than one multiple of padding."""

from pathlib import Path

import pytest
import torch

from sail_megatron.config.precision import _FP8_RECIPES
from sail_megatron.config.presets import PRESETS
from sail_megatron.config.train import load_train_config
from sail_megatron.model.fp8_shapes import fp8_token_multiple, pad_rows
from sail_megatron.model.tile_layout import TileLayout

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*/*.yaml") if not p.name.startswith("_"))
TILE_COUNTS = range(1, 50)  # a text-only micro-batch runs 1 blank tile; SFT micro-batches tens


def test_token_multiples_follow_hopper_wgrad_rule():
    assert fp8_token_multiple("delayed") == 16
    assert fp8_token_multiple("tensorwise") == 16
    assert fp8_token_multiple("blockwise") == 16
    assert fp8_token_multiple("mxfp8") == 32


def _check_model(preset: str, recipe: str) -> None:
    cfg = PRESETS[preset]
    multiple = fp8_token_multiple(recipe)
    layout = TileLayout(cfg.vision.num_positions, multiple)
    for tiles in TILE_COUNTS:
        vit = layout.tokens(tiles)
        assert vit % multiple == 0, (preset, recipe, tiles, vit)
        assert vit - tiles * cfg.vision.num_positions < multiple, "padding under one multiple"
        projector = pad_rows(torch.empty(tiles * cfg.tokens_per_tile, 0), multiple).shape[0]
        assert projector % multiple == 0 and projector - tiles * cfg.tokens_per_tile < multiple


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("recipe", _FP8_RECIPES)
def test_every_preset_meets_the_rule(preset, recipe):
    _check_model(preset, recipe)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_meets_the_rule_with_fp8_vision(path):
    cfg = load_train_config(path)
    _check_model(cfg.model_preset, cfg.precision.fp8_recipe)


def test_layout_is_packed_only_where_tiles_cannot_meet_the_rule():
    assert TileLayout(1025, 16).packed  # InternViT: patches + CLS
    assert not TileLayout(1024, 16).packed and not TileLayout(1024, 32).packed  # AIMv2
    assert not TileLayout(1025, 1).packed  # no FP8
    assert TileLayout(1025, 16).tokens(1) == 1040 and TileLayout(1025, 16).tokens(16) == 16400
