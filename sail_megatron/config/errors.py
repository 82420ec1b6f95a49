"""The one error type every config check raises, and how error messages shorten long lists."""

from typing import List


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        super().__init__(f"{field}: {problem}. Fix: {fix}")


def first_and_count(items: List[str], shown: int) -> List[str]:
    """The first `shown` items, then one "... and N more" for the rest: a long list in an error message."""
    return items[:shown] + ([f"... and {len(items) - shown} more"] if len(items) > shown else [])
