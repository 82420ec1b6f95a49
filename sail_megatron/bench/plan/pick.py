"""Which layout `sail-bench plan` picks, and why: the fastest that fits, ties broken by fewer model-parallel
ranks and then less memory."""

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from sail_megatron.bench.plan.layouts import Layout
from sail_megatron.bench.plan.memory import Memory
from sail_megatron.bench.plan.model_state import GIB
from sail_megatron.bench.plan.throughput import StepTime

TIE = 0.005
"""Layouts within 0.5% of the fastest count as equally fast."""


@dataclass
class Planned:
    layout: Layout
    memory: Memory
    fits: bool
    tokens_per_s_per_gpu: float
    mfu: float
    step: StepTime
    gpu_hours: float
    days: float
    picked: bool = False

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self.layout)
        d.update(
            memory_gib_per_gpu=self.memory.total / GIB,
            memory_split_gib=self.memory.split_gib(),
            memory_stage=self.memory.stage,
            fits=self.fits,
            tokens_per_s_per_gpu=self.tokens_per_s_per_gpu,
            mfu=self.mfu,
            step_s=self.step.total,
            comm_fraction=self.step.comm_fraction,
            comm_s={
                "tensor_parallel": self.step.tensor_parallel,
                "pipeline": self.step.pipeline,
                "expert_parallel": self.step.expert_parallel,
                "data_parallel_exposed": self.step.data_parallel,
                "data_parallel_before_overlap": self.step.data_parallel_before_overlap,
            },
            gpu_hours=self.gpu_hours,
            days=self.days,
            picked=self.picked,
        )
        return d


def table_order(p: Planned):
    """Fitting layouts first, fastest first, then fewest model-parallel ranks, then least memory."""
    return (not p.fits, -p.tokens_per_s_per_gpu, p.layout.model_parallel, p.memory.total)


def pick(planned: List[Planned]) -> Tuple[Optional[Planned], str]:
    fitting = [p for p in planned if p.fits]
    if not fitting:
        least = min(planned, key=lambda p: p.memory.total)
        return None, f"no layout fits; the smallest needs {least.memory.total / GIB:.1f} GiB per GPU"
    fastest = max(p.tokens_per_s_per_gpu for p in fitting)
    ties = [p for p in fitting if p.tokens_per_s_per_gpu >= (1 - TIE) * fastest]
    chosen = min(ties, key=lambda p: (p.layout.model_parallel, p.memory.total, -p.tokens_per_s_per_gpu))
    chosen.picked = True
    why = f"the fastest of the {len(fitting)} layouts that fit"
    if len(ties) > 1:
        why += (
            f"; {len(ties)} are within {100 * TIE:.1f}% of it: fewest model-parallel ranks (TP x PP = "
            f"{chosen.layout.model_parallel}), then least memory"
        )
    return chosen, why
