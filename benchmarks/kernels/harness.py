"""A tiny shared timer for the kernel benchmarks: warm-up, median of N, a table with GB/s and the speed ratio.

Bytes are the ideal traffic of the operation (every byte that must be read plus every byte written), the
same count for both implementations, so GB/s compares them directly. On CUDA, times come from CUDA events
and a "% of peak" column relates the Triton figure to H100 HBM3 bandwidth. Without CUDA only the reference
is timed: interpreted Triton (TRITON_INTERPRET=1) is a correctness tool and is never timed as a result.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

H100_PEAK_BYTES_PER_S = 3.35e12  # H100 SXM HBM3


def on_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> str:
    return "cuda" if on_cuda() else "cpu"


def time_fn(fn: Callable[[], object], warmup: int = 5, iters: int = 20) -> float:
    """Median seconds per call of fn() (CUDA events on a GPU, perf_counter on the host)."""
    for _ in range(warmup):
        fn()
    times = []
    if on_cuda():
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Result:
    case: str
    bytes_moved: int
    reference_s: float
    triton_s: float | None  # None where no GPU: Triton is not timed


def run_case(
    case: str,
    bytes_moved: int,
    reference: Callable[[], object],
    triton: Callable[[], object],
    warmup: int = 5,
    iters: int = 20,
) -> Result:
    """Time the reference always, Triton only on CUDA."""
    ref_s = time_fn(reference, warmup, iters)
    tri_s = time_fn(triton, warmup, iters) if on_cuda() else None
    return Result(case, bytes_moved, ref_s, tri_s)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def print_table(title: str, results: list[Result]) -> None:
    where = torch.cuda.get_device_name() if on_cuda() else "CPU (no CUDA)"
    print(f"\n{title} -- {where}")
    head = f"{'case':<40} {'MB':>8} {'ref ms':>9} {'ref GB/s':>9} {'triton ms':>10} {'triton GB/s':>12}"
    head += f" {'% H100 peak':>12} {'ref/triton':>11}"
    print(head)
    print("-" * len(head))
    for r in results:
        ref = _gbps(r.bytes_moved, r.reference_s)
        line = f"{r.case:<40} {r.bytes_moved / 1e6:>8.1f} {r.reference_s * 1e3:>9.3f} {ref:>9.1f}"
        if r.triton_s is None:
            line += f" {'-':>10} {'-':>12} {'-':>12} {'-':>11}"
        else:
            tri = _gbps(r.bytes_moved, r.triton_s)
            line += (
                f" {r.triton_s * 1e3:>10.3f} {tri:>12.1f} {100 * tri * 1e9 / H100_PEAK_BYTES_PER_S:>11.1f}%"
                f" {r.reference_s / r.triton_s:>10.2f}x"
            )
        print(line)
    if not on_cuda():
        print("Triton columns need a CUDA GPU (the CPU interpreter is for correctness, not timing): reference only.")
