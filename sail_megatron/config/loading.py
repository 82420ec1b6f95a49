"""Nested dicts (YAML recipes plus `dotted.key=value` overrides) -> typed, checked dataclasses.

Unknown keys and values of the wrong type are errors that name the dotted key; nothing is evaluated
(values are parsed with yaml.safe_load only).
"""

import collections.abc
import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Type, TypeVar

import yaml

from sail_megatron.config.counts import Count, parse_count
from sail_megatron.config.errors import ConfigError

T = TypeVar("T")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _shape(tp) -> str:
    """'list', 'mapping' or 'scalar': what a YAML value of type `tp` looks like."""
    origin = typing.get_origin(tp)
    if origin in (list, List, Sequence):
        return "list"
    if origin in (dict, Dict, Mapping, collections.abc.Mapping) or dataclasses.is_dataclass(tp):
        return "mapping"
    return "scalar"


def _shape_of(value: Any) -> str:
    return "list" if isinstance(value, list) else "mapping" if isinstance(value, dict) else "scalar"


def _coerce(value: Any, tp, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        # Union[A, B]: the options of the value's shape (a list for List[...], a mapping for Dict[...]).
        if len(inner) > 1:
            shaped = [o for o in inner if _shape(o) == _shape_of(value)]
            inner = shaped or inner
        for option in inner[:-1]:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key)
    if tp is Count:
        return parse_count(value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping for {_type_name(tp)}, got {value!r}", "write a nested section")
        return from_dict(tp, value, key)
    if origin in (list, List, Sequence):
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}", "write a YAML list, e.g. [a, b]")
        return [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict, Mapping, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}", "write a YAML mapping, e.g. {a: x, b: y}")
        key_type, value_type = args if args else (Any, Any)
        for k in value:
            if key_type is str and not isinstance(k, str):
                raise ConfigError(f"{key}.{k}", f"the key {k!r} is not a string", f"quote it: '{k}'")
        return {_coerce(k, key_type, f"{key}.{k}"): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool) or tp in (int, float) and isinstance(value, bool):
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}", f"write a {_type_name(tp)}")
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}", f"write a {_type_name(tp)}")
    return value


def from_dict(cls: Type[T], data: Dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in (data or {}).items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(dotted, "unknown key", f"use one of {sorted(fields)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    """`top` over `base`, section by section: a mapping changes only the keys it names (how a child recipe
    inherits, and how a `section={...}` override applies); any other value replaces."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """`a.b.c=value` strings (value parsed as YAML) applied to a nested dict, in order. A mapping value
    merges into the section it names, as in a child recipe (`data={seq_length: 256}` keeps the rest)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override needs the form dotted.key=value", "e.g. optim.lr=1e-4")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(dotted, f"{k} is not a section", "override a leaf key")
        # `key=` is the empty string (a system prompt of none), not YAML's null: write `key=null` for that.
        value = yaml.safe_load(raw) if raw.strip() else ""
        old = node.get(keys[-1])
        node[keys[-1]] = merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return data


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(path: Path) -> Dict[str, Any]:
    """A recipe file as a dict; unreadable files and YAML errors become ConfigErrors naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(str(path), "the recipe file does not exist", "check the path given to --config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"cannot read the recipe: {e}", "pass a readable UTF-8 YAML file") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            str(path),
            f"is not valid YAML{line}: {problem}",
            "fix the YAML there (indent with spaces, close every bracket, give each key once)",
        ) from None
    if data is None:
        raise ConfigError(str(path), "the recipe is empty", "give at least model_preset and data, or inherit a recipe")
    if not isinstance(data, dict):
        raise ConfigError(str(path), "a recipe must be a YAML mapping", "start the file with top-level keys")
    return data
