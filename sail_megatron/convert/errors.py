"""The error every conversion check raises: it lists all problems found, not just the first."""

from typing import Iterable, Optional


class ConversionError(ValueError):
    """Input that cannot be converted; `problems` holds one line per thing that is wrong."""

    def __init__(self, what: str, problems: Iterable[str], fix: Optional[str] = None):
        self.what = what
        self.problems = list(problems)
        if len(self.problems) == 1:  # one problem reads best on one line
            lines = [f"{what}: {self.problems[0]}"]
        else:
            lines = [f"{what}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in self.problems]
        if fix:
            lines.append(f"Fix: {fix}")
        super().__init__("\n".join(lines))


def raise_if(problems: Iterable[str], what: str, fix: Optional[str] = None) -> None:
    """Raise a ConversionError when `problems` is not empty."""
    problems = list(problems)
    if problems:
        raise ConversionError(what, problems, fix)
