"""Parts that run a folder of our tests under pytest: `pytest-gpu` (tests/gpu) and `kernel-tests`
(tests/kernels). Their figures are the counts of pytest's last summary line."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Sequence, Tuple

from sail_megatron.bench.gpu_check.runner import Context, Part

_COUNTED = r"(passed|failed|skipped|errors?|xfailed|xpassed)"


def pytest_summary(log: str) -> Tuple[Dict[str, int], str]:
    """(counts by outcome, pytest's summary line) from a pytest log."""
    summary = next(
        (
            line.strip("= ")
            for line in reversed(log.splitlines())
            if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line)
        ),
        "",
    )
    counts = {k: int(n) for n, k in re.findall(rf"(\d+) {_COUNTED}", summary)}
    return counts, summary


def pytest_part(name: str, title: str, paths: Sequence[str], timeout_s: float) -> Part:
    def command(ctx: Context) -> List[str]:
        return [ctx.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *paths]

    def collect(ctx: Context, log: str) -> Tuple[Dict[str, Any], str]:
        return pytest_summary(log)

    return Part(name, title, timeout_s, command, collect)


def pytest_gpu(timeout_s: float) -> Part:
    return pytest_part(
        "pytest-gpu",
        "The GPU tests (tests/gpu): training steps on NCCL + CUDA, bf16 and (with Transformer Engine) FP8.",
        ["tests/gpu"],
        timeout_s,
    )


def kernel_tests(timeout_s: float) -> Part:
    return pytest_part(
        "kernel-tests",
        "The kernel tests (tests/kernels): on CUDA they run the compiled kernels against "
        "their PyTorch references, forward and backward.",
        ["tests/kernels"],
        timeout_s,
    )
