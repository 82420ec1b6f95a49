"""How far the stage has come against its budget: steps, tokens and samples consumed by the whole job.

The counts are summed over the data-parallel ranks every step (one small all-reduce), so every rank
takes the same stop decision at the same step, and they are global: a checkpoint carries them, and a
resume under another data-parallel size continues them exactly.
"""

import logging
from dataclasses import dataclass
from typing import Any, Dict, List

from sail_megatron.config import ConfigError
from sail_megatron.config.budget import Budget, ScalePoints
from sail_megatron.config.counts import format_count
from sail_megatron.training.collectives import sum_over_data_parallel
from sail_megatron.training.metered_data import DataTally

logger = logging.getLogger(__name__)

# Keys of the checkpoint's common state (consumed_rows: step x global batch, for the record).
TOKENS_KEY, SAMPLES_KEY, ROWS_KEY, SCHEDULE_UNIT_KEY = (
    "consumed_tokens",
    "consumed_samples",
    "consumed_rows",
    "lr_schedule_unit",
)


@dataclass
class Consumed:
    steps: int = 0
    tokens: int = 0
    samples: int = 0

    def of(self, unit: str) -> int:
        return getattr(self, unit)


class Progress:
    """The job's consumption so far, its budget and its scaling-curve checkpoints."""

    def __init__(self, budget: Budget, points: ScalePoints, consumed: Consumed):
        self.budget, self.points, self.consumed = budget, points, consumed
        self.last_step = Consumed()
        """What the latest step consumed, over the whole job."""
        self.crossed: List[int] = []
        """The scaling-curve points (token counts) the latest step reached."""

    @classmethod
    def resumed(cls, budget: Budget, points: ScalePoints, step: int, common: Dict[str, Any]) -> "Progress":
        """From a checkpoint's common state; checkpoints written before tokens were counted start at 0."""
        if TOKENS_KEY not in common and budget.unit == "tokens":
            logger.warning("the checkpoint records no consumed tokens: counting them from 0 at step %d", step)
        return cls(budget, points, Consumed(step, int(common.get(TOKENS_KEY, 0)), int(common.get(SAMPLES_KEY, 0))))

    def count_step(self, tally: DataTally) -> Consumed:
        """Collective: add this rank's step tally, summed over the data-parallel ranks; returns what the
        step consumed over the whole job (self.crossed: the scaling-curve points it reached)."""
        tokens, samples = sum_over_data_parallel([tally.tokens, tally.samples])
        before = self.consumed.tokens
        self.last_step = Consumed(1, int(tokens), int(samples))
        c = self.consumed
        self.consumed = Consumed(c.steps + 1, c.tokens + int(tokens), c.samples + int(samples))
        self.crossed = self.points.crossed(before, self.consumed.tokens)
        return self.last_step

    @property
    def done(self) -> bool:
        return self.consumed.of(self.budget.unit) >= self.budget.amount

    @property
    def fraction(self) -> float:
        return min(self.consumed.of(self.budget.unit) / self.budget.amount, 1.0)

    def remaining(self) -> int:
        return max(self.budget.amount - self.consumed.of(self.budget.unit), 0)

    def checkpoint_state(self, global_batch_size: int) -> Dict[str, Any]:
        return {
            ROWS_KEY: self.consumed.steps * global_batch_size,
            TOKENS_KEY: self.consumed.tokens,
            SAMPLES_KEY: self.consumed.samples,
        }

    def describe(self) -> str:
        c, unit = self.consumed, self.budget.unit
        here = str(c.steps) if unit == "steps" else format_count(c.of(unit))
        return (
            f"{here} of {self.budget.describe()} (step {c.steps}, {format_count(c.tokens)} tokens, {c.samples} samples)"
        )


def check_schedule_unit(common: Dict[str, Any], schedule, budget: Budget) -> None:
    """A resume keeps the budget's unit: the saved lr-schedule progress is counted in it."""
    saved = common.get(SCHEDULE_UNIT_KEY, "steps")
    if saved != schedule.unit:
        raise ConfigError(
            budget.field,
            f"the run's checkpoints count the lr schedule in {saved}, this recipe budgets the stage in {budget.unit}",
            f"keep the budget in {saved} (run.train_{saved}) for this run, or start a new stage from its "
            "checkpoint with run.init_from and a new run.save_dir",
        )
