"""The learning-rate schedule's lengths, in the unit of the stage's budget.

A stage budgeted in steps may give its warmup and decay in steps (`optim.warmup_steps`, ...) or as
fractions of the budget (`optim.warmup_fraction`, ...). A stage budgeted in tokens or samples cannot know
its step count before it runs (packing decides how many records a step holds), so its schedule runs in
that unit: it advances by the tokens (or samples) each step consumed, and its lengths are fractions of
the budget.
"""

from dataclasses import dataclass

from sail_megatron.config.budget import Budget
from sail_megatron.config.counts import format_count
from sail_megatron.config.errors import ConfigError
from sail_megatron.config.optim import OptimConfig

PHASES = ("warmup", "decay", "wsd_decay")


@dataclass(frozen=True)
class LrSchedule:
    unit: str
    """'steps', 'tokens' or 'samples': what one unit of schedule progress is."""
    warmup: int
    decay: int
    """Where the lr reaches min_lr, counted from the start of the stage (warmup included)."""
    wsd_decay: int = 0
    """wsd only: length of the final anneal."""

    def describe(self, style: str) -> str:
        def n(x: int) -> str:
            return str(x) if self.unit == "steps" else format_count(x)

        anneal = f", anneal over the last {n(self.wsd_decay)}" if style == "wsd" else ""
        return f"{style} in {self.unit}: warmup {n(self.warmup)}, min lr at {n(self.decay)}{anneal}"


def _length(optim: OptimConfig, phase: str, budget: Budget, default_fraction: float) -> int:
    steps, fraction = getattr(optim, f"{phase}_steps"), getattr(optim, f"{phase}_fraction")
    if steps is not None and fraction is not None:
        raise ConfigError(
            f"optim.{phase}_steps",
            f"is set together with optim.{phase}_fraction",
            f"set one of them and null the other (optim.{phase}_steps=null)",
        )
    if steps is not None:
        if budget.unit != "steps":
            raise ConfigError(
                f"optim.{phase}_steps",
                f"counts optimizer steps, but this stage's budget is {budget.field} and its schedule runs in "
                f"{budget.unit} (how many steps that is depends on packing)",
                f"give optim.{phase}_fraction (of the budget) instead and set optim.{phase}_steps=null",
            )
        return steps
    return round((default_fraction if fraction is None else fraction) * budget.amount)


def resolve_lr_schedule(optim: OptimConfig, budget: Budget) -> LrSchedule:
    """The schedule's lengths in the budget's unit; a ConfigError naming the field when they do not fit."""
    warmup = _length(optim, "warmup", budget, 0.0)
    decay = _length(optim, "decay", budget, 1.0)
    wsd_decay = _length(optim, "wsd_decay", budget, 0.0) if optim.schedule == "wsd" else 0
    if warmup < 0 or decay <= warmup:
        raise ConfigError(
            "optim.decay_steps" if optim.decay_steps is not None else "optim.decay_fraction",
            f"the lr would reach min_lr at {decay} {budget.unit}, not after the warmup of {warmup}",
            "make the decay longer than the warmup (by default it lasts the whole budget)",
        )
    if optim.schedule == "wsd" and not 0 < wsd_decay <= decay - warmup:
        raise ConfigError(
            "optim.wsd_decay_steps" if optim.wsd_decay_steps is not None else "optim.wsd_decay_fraction",
            f"the anneal is {wsd_decay} {budget.unit} with warmup {warmup} and decay ending at {decay}",
            "set optim.wsd_decay_steps or optim.wsd_decay_fraction so that 0 < anneal <= decay - warmup",
        )
    return LrSchedule(budget.unit, warmup, decay, wsd_decay)
