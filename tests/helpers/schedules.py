"""The lr schedule a test's optimizer runs, resolved as the trainer resolves a steps budget."""

from sail_megatron.config.budget import Budget
from sail_megatron.config.lr_schedule import LrSchedule, resolve_lr_schedule
from sail_megatron.config.optim import OptimConfig


def steps_schedule(optim: OptimConfig, steps: int = 1000) -> LrSchedule:
    """`optim`'s schedule for a stage of `steps` steps (its decay defaults to the whole stage)."""
    return resolve_lr_schedule(optim, Budget("steps", steps))
