"""Large counts written the way people say them: `131B` tokens, `21M` samples, `3.5M`, `2_000`, `52e9`."""

import math
import re
from typing import Union

from sail_megatron.config.errors import ConfigError

SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_COUNT = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([KMBT]?)\s*$", re.IGNORECASE)


class Count(int):
    """Type marker for config fields holding a count (the parsed value is a plain int)."""


def parse_count(value: Union[int, float, str], field: str) -> int:
    """An int, or a string like '131B' / '3.5M' / '52e9', as a whole positive number; a ConfigError
    naming `field` otherwise."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value == int(value):
        number = int(value)
    elif isinstance(value, str) and _COUNT.match(value):
        digits, suffix = _COUNT.match(value).groups()
        digits = digits.replace("_", "")
        if not suffix and not any(c in digits for c in ".eE"):
            number = int(digits)  # exact, however long
        else:
            scaled = float(digits) * SUFFIXES.get(suffix.upper(), 1)
            number = round(scaled) if abs(scaled - round(scaled)) <= 1e-9 * scaled else None
    if number is None or number < 1:
        raise ConfigError(
            field,
            f"cannot read {value!r} as a positive whole count",
            "write a number, optionally with K, M, B or T (thousand, million, billion, trillion), e.g. 131B or 3.5M",
        )
    return int(number)


def format_count(n: float) -> str:
    """131000000000 -> '131B', 3500000 -> '3.5M', 999 -> '999' (3 significant digits at most)."""
    for suffix in ("T", "B", "M", "K"):
        scale = SUFFIXES[suffix]
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}" if isinstance(n, float) and n != int(n) else str(int(n))
