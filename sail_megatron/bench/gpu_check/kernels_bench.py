"""`kernels-bench`: the benchmarks/kernels scripts, compiled Triton kernels against their PyTorch references
at training sizes, in GB/s and as a share of the device's memory bandwidth."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List

from sail_megatron.bench.gpu_check.helpers import Figures
from sail_megatron.bench.gpu_check.probe import memory_bandwidth
from sail_megatron.bench.gpu_check.runner import Part
from sail_megatron.bench.gpu_check.worker import read_figures, worker_command

NAME = "kernels-bench"


def worker(fig: Figures, root: Path) -> None:
    """Runs each benchmarks/kernels script's main(), keeping the results its table prints."""
    import importlib

    import torch

    # As `python benchmarks/kernels/bench_x.py` runs them: the scripts import `harness` from their folder.
    scripts = root / "benchmarks" / "kernels"
    sys.path.insert(0, str(scripts))
    import harness

    props = torch.cuda.get_device_properties(0)
    bandwidth, source = memory_bandwidth(torch.cuda.get_device_name(0), props)
    fig.figures["memory bandwidth (TB/s)"] = bandwidth / 1e12 if bandwidth else None
    fig.figures["bandwidth source"] = source
    rows: List[Dict[str, Any]] = []
    fig.figures["kernels"] = rows
    show = harness.print_table

    def keep(title, results):
        for r in results:
            row = {
                "kernel": title,
                "case": r.case,
                "MB moved": r.bytes_moved / 1e6,
                "reference ms": r.reference_s * 1e3,
                "reference GB/s": r.bytes_moved / r.reference_s / 1e9,
            }
            if r.triton_s is not None:
                gbps = r.bytes_moved / r.triton_s / 1e9
                row.update(
                    {
                        "triton ms": r.triton_s * 1e3,
                        "triton GB/s": gbps,
                        "% of bandwidth": 100 * gbps * 1e9 / bandwidth if bandwidth else None,
                        "speed-up": r.reference_s / r.triton_s,
                    }
                )
            rows.append(row)
        fig.save()
        show(title, results)

    harness.print_table = keep
    for script in sorted(p.stem for p in scripts.glob("bench_*.py")):
        try:
            importlib.import_module(script).main()
        except Exception:
            traceback.print_exc()
            fig.fail(f"benchmarks/kernels/{script}.py failed")
    timed = [r for r in rows if "triton GB/s" in r]
    if timed:
        best = max(timed, key=lambda r: r["triton GB/s"])
        fig.summary = (
            f"{len(timed)} cases; best {best['triton GB/s']:.0f} GB/s"
            + (f" ({best['% of bandwidth']:.0f}% of bandwidth)" if best.get("% of bandwidth") else "")
            + f"; speed-up over the reference {min(r['speed-up'] for r in timed):.2f}x"
            f"-{max(r['speed-up'] for r in timed):.2f}x"
        )
    else:
        fig.fail("no Triton timing came back")


def part(timeout_s: float) -> Part:
    return Part(
        NAME,
        "The benchmarks/kernels scripts: compiled Triton kernels vs their PyTorch references at "
        "training sizes, GB/s against the device's memory bandwidth.",
        timeout_s,
        worker_command(NAME),
        read_figures(NAME),
    )
