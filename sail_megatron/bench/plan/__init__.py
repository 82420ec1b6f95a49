"""`sail-bench plan`: layouts, memory, throughput and the cost of a recipe's budget on N GPUs, by
arithmetic (docs/design.md, "Planning a cluster run")."""

from sail_megatron.bench.plan.planner import main, plan

__all__ = ["main", "plan"]
