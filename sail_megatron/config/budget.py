"""How long a stage trains: a budget in optimizer steps, in tokens or in samples (exactly one), and the
token counts at which a run keeps extra checkpoints for a scaling curve.

Tokens are the non-padding tokens the language model trains on (text and image tokens); samples are the
original records, however packing grouped them. Both are counted over the whole job (every data-parallel
rank), so they survive a resume under another data-parallel size.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

from sail_megatron.config.counts import format_count, parse_count
from sail_megatron.config.errors import ConfigError

UNITS = ("steps", "tokens", "samples")
BUDGET_FIELDS = {unit: f"run.train_{unit}" for unit in UNITS}
DEFAULT_LOG2_START = 10**9
"""`run.save_at_tokens: log2` doubles from 1B tokens unless a start is given (`log2:250M`)."""


@dataclass(frozen=True)
class Budget:
    unit: str
    """'steps', 'tokens' or 'samples'."""
    amount: int

    @property
    def field(self) -> str:
        return BUDGET_FIELDS[self.unit]

    def describe(self) -> str:
        return f"{format_count(self.amount)} {self.unit}" if self.unit != "steps" else f"{self.amount} steps"


def budget_of(steps: Optional[int], tokens: Optional[int], samples: Optional[int]) -> Budget:
    """The one budget set among run.train_steps / train_tokens / train_samples; a ConfigError otherwise."""
    given = [Budget(u, n) for u, n in zip(UNITS, (steps, tokens, samples)) if n is not None]
    if len(given) != 1:
        named = ", ".join(f"{b.field}={b.amount}" for b in given) or "none of them"
        raise ConfigError(
            "run.train_steps",
            f"a stage needs exactly one budget among run.train_steps, run.train_tokens and run.train_samples; "
            f"got {named}",
            "set one and null the others (e.g. run.train_tokens=131B run.train_steps=null when a recipe it "
            "inherits sets train_steps)",
        )
    return given[0]


@dataclass(frozen=True)
class ScalePoints:
    """Token counts at which a checkpoint is kept for good (`run.save_at_tokens`): a list, or doublings."""

    points: Sequence[int] = ()
    doubling_from: Optional[int] = None

    def crossed(self, before: int, after: int) -> List[int]:
        """The points p with before < p <= after (a step that passes several keeps one checkpoint)."""
        out = [p for p in self.points if before < p <= after]
        if self.doubling_from is not None:
            p = self.doubling_from
            while p <= after:
                if p > before:
                    out.append(p)
                p *= 2
        return sorted(set(out))


def scale_points(spec: Union[None, str, Sequence]) -> ScalePoints:
    """run.save_at_tokens -> ScalePoints: null (none), a list of counts, 'log2' or 'log2:START'."""
    field = "run.save_at_tokens"
    if spec is None:
        return ScalePoints()
    if isinstance(spec, str):
        head, _, start = spec.partition(":")
        if head.strip() != "log2":
            raise ConfigError(
                field,
                f"unknown form {spec!r}",
                "give a list of token counts (e.g. [1B, 10B, 100B]), 'log2' (doubling from 1B) or 'log2:START' "
                "(e.g. log2:250M)",
            )
        return ScalePoints(doubling_from=parse_count(start, field) if start.strip() else DEFAULT_LOG2_START)
    return ScalePoints(points=tuple(sorted({parse_count(p, f"{field}[{i}]") for i, p in enumerate(spec)})))
