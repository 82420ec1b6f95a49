"""data.valid_path takes one path (as before), a list or a mapping name -> path, from recipes and overrides;
a wrong shape is an error naming the key."""

from pathlib import Path

import pytest

from sail_megatron.config import ConfigError
from sail_megatron.config.train import dump, load_train_config

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny" / "demo.yaml"


def _valid_path(*overrides):
    cfg = load_train_config(RECIPE, list(overrides))
    cfg.data.validate()
    return cfg.data.valid_path


def test_the_three_shapes(tmp_path):
    assert _valid_path() is None
    assert _valid_path("data.valid_path=held/out") == "held/out"
    assert _valid_path("data.valid_path=[a, b/blend.yaml]") == ["a", "b/blend.yaml"]
    assert _valid_path("data.valid_path={ocr: a, chat/en: b}") == {"ocr": "a", "chat/en": "b"}
    # The resolved config (config.yaml) reads back the same.
    child = tmp_path / "child.yaml"
    cfg = load_train_config(RECIPE, ["data.valid_path={ocr: a, caption: b}"])
    child.write_text(dump(cfg))
    assert load_train_config(child, []).data.valid_path == {"ocr": "a", "caption": "b"}
    # A mapping replaces a path or list given before it (and null resets it).
    assert _valid_path("data.valid_path=[a]", "data.valid_path={x: y}") == {"x": "y"}
    assert _valid_path("data.valid_path={x: y}", "data.valid_path=null", "data.valid_path={z: w}") == {"z": "w"}


@pytest.mark.parametrize(
    "override, field, says",
    [
        ("data.valid_path=3", "data.valid_path", "expected str"),
        ("data.valid_path=[a, 3]", "data.valid_path[1]", "expected str"),
        ("data.valid_path={a: [b]}", "data.valid_path.a", "expected str"),
        ("data.valid_path={2024: b}", "data.valid_path.2024", "not a string"),
        ("data.valid_path={a b: c}", "data.valid_path.a b", "not a usable source name"),
        ("data.valid_path={a: ''}", "data.valid_path.a", "is empty"),
        ("data.valid_path=[]", "data.valid_path", "empty list"),
        ("data.valid_path={}", "data.valid_path", "empty mapping"),
    ],
)
def test_wrong_shapes_name_the_key(override, field, says):
    with pytest.raises(ConfigError) as info:
        _valid_path(override)
    assert info.value.field == field and says in str(info.value) and "Fix:" in str(info.value)
