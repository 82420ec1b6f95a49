"""`make gpu-check`: one pass over everything in this project that only a GPU can run, within 8 minutes on
one H100/H200, ending in one report (`gpu_check/report.md`, `gpu_check/report.json` and a short
`gpu_check/summary.txt` to paste into an issue). docs/gpu.md says what each part runs and why it is GPU-only.

The modules: `cli` (the command and its flags), `runner` (parts in subprocesses under timeouts and one budget),
`parts` (the registry: which parts, in which order, with which limits), `report`, `probe` (the environment),
`worker` (how a part runs our code in its subprocess), `helpers` (what the workers share), and one module per
part: `pytest_parts` (pytest-gpu, kernel-tests), `layers`, `moe_experts`, `fp8_vision`, `train_bench` (train-bf16,
train-fp8), `memory_check` (memory-model), `kernels_bench`, `decode`, `init_from`, `restart`. One part
alone: `--only NAME`.
"""

from sail_megatron.bench.gpu_check.cli import main
from sail_megatron.bench.gpu_check.parts import DEFAULT_BUDGET_S, WORKERS, default_parts
from sail_megatron.bench.gpu_check.probe import memory_bandwidth
from sail_megatron.bench.gpu_check.report import render_markdown, render_summary, report_document, write_report
from sail_megatron.bench.gpu_check.runner import Context, Part, PartResult, run_part, run_parts
from sail_megatron.bench.gpu_check.train_bench import bench_figures

__all__ = [
    "DEFAULT_BUDGET_S",
    "WORKERS",
    "Context",
    "Part",
    "PartResult",
    "bench_figures",
    "default_parts",
    "main",
    "memory_bandwidth",
    "render_markdown",
    "render_summary",
    "report_document",
    "run_part",
    "run_parts",
    "write_report",
]
