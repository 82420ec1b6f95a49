"""How many tiles the ViT must run together under FP8."""

from types import SimpleNamespace

import pytest

from sail_megatron.model.fp8_shapes import fp8_tile_multiple, fp8_token_multiple


@pytest.mark.parametrize(
    "recipe,tokens,tiles",
    [
        ("delayed", 1025, 8),
        ("tensorwise", 1025, 8),
        ("mxfp8", 1025, 32),
        ("delayed", 1024, 1),
        ("delayed", 1028, 2),
        ("mxfp8", 1040, 2),
    ],
)
def test_tile_multiple_meets_te_rule(recipe, tokens, tiles):
    config = SimpleNamespace(fp8="hybrid", fp8_recipe=recipe)
    assert fp8_tile_multiple(config, tokens) == tiles
    assert (tiles * tokens) % fp8_token_multiple(recipe) == 0


def test_no_padding_without_fp8():
    assert fp8_tile_multiple(SimpleNamespace(fp8=None, fp8_recipe="delayed"), 1025) == 1
