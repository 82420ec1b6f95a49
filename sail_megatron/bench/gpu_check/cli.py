"""The command: `python tools/gpu_check.py` (`make gpu-check`) or `python -m sail_megatron.bench.gpu_check`.
Without CUDA it says so and returns 2 before running anything; with CUDA it runs the parts, writes the
report and returns 0 when no part failed or timed out, 1 otherwise."""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from sail_megatron.bench.gpu_check.parts import DEFAULT_BUDGET_S, default_parts
from sail_megatron.bench.gpu_check.probe import probe_in_subprocess
from sail_megatron.bench.gpu_check.report import environment_lines, report_document, write_report
from sail_megatron.bench.gpu_check.runner import Context, Part, PartResult, run_parts
from sail_megatron.bench.gpu_check.train_bench import build_tokenizer


def cuda_problem() -> Optional[str]:
    """Why this machine cannot run the check, or None."""
    try:
        import torch
    except ImportError as e:
        return f"torch is not importable ({e})"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"torch {torch.__version__} ({build}) sees no CUDA device"
    return None


def parser(parts: Sequence[Part]) -> argparse.ArgumentParser:
    names = [p.name for p in parts]
    ap = argparse.ArgumentParser(
        prog="gpu_check",
        description="One-shot check of the GPU-only paths; writes OUT/report.md, OUT/report.json and "
        "OUT/summary.txt (docs/gpu.md).",
    )
    ap.add_argument("--out", type=Path, default=Path("gpu_check"), help="report folder (default: gpu_check)")
    ap.add_argument("--only", action="append", choices=names, default=[], help="run only these parts (repeatable)")
    ap.add_argument("--skip", action="append", choices=names, default=[], help="leave these parts out (repeatable)")
    ap.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"seconds for the whole check; parts that do not fit are cut or skipped (default {DEFAULT_BUDGET_S})",
    )
    ap.add_argument("--list", action="store_true", help="list the parts and exit")
    return ap


def chosen_parts(parts: Sequence[Part], only: Sequence[str], skip: Sequence[str]) -> List[Part]:
    """The parts to run, in the registry's order: those named with --only, else the default run's."""
    return [p for p in parts if (p.name in only if only else p.in_default_run) and p.name not in skip]


def list_parts(parts: Sequence[Part]) -> str:
    return "\n".join(
        f"{p.name:<14} {p.timeout_s:>4.0f} s  {p.title}{'' if p.in_default_run else ' (only with --only)'}"
        for p in parts
    )


def main(argv: Optional[Sequence[str]] = None, root: Optional[Path] = None) -> int:
    parts = default_parts()
    args = parser(parts).parse_args(argv)
    if args.list:
        print(list_parts(parts))
        return 0
    problem = cuda_problem()
    if problem is not None:
        print(f"gpu-check needs a CUDA GPU: {problem}. Nothing was run.", file=sys.stderr)
        return 2
    root = Path(root or Path.cwd()).resolve()
    out = args.out if args.out.is_absolute() else root / args.out
    shutil.rmtree(out / "work", ignore_errors=True)
    shutil.rmtree(out / "logs", ignore_errors=True)
    ctx = Context(root=root, out=out)
    ctx.work.mkdir(parents=True, exist_ok=True)
    started, began = datetime.datetime.now().astimezone(), time.monotonic()
    print(f"gpu-check: probing the environment ({ctx.figures_path('environment')})", flush=True)
    ctx.env = probe_in_subprocess(ctx)
    ctx.tokenizer, error = build_tokenizer(ctx)
    if error:
        ctx.env["tokenizer_error"] = error
    print("\n".join(environment_lines(ctx.env)), flush=True)

    def done(r: PartResult) -> None:
        print(f"gpu-check: {r.name:<14} {r.status:<8} {r.seconds:>5.0f} s  {r.summary or r.reason}", flush=True)

    chosen = chosen_parts(parts, args.only, args.skip)
    results = run_parts(chosen, ctx, args.budget - (time.monotonic() - began), on_done=done)
    doc = report_document(ctx.env, results, started, time.monotonic() - began, args.budget)
    paths = write_report(out, doc)
    counts = doc["counts"]
    print(
        f"gpu-check: {counts['passed']} passed, {counts['failed']} failed, {counts['timeout']} timed out, "
        f"{counts['skipped']} skipped; report: {paths.markdown}, {paths.json} and {paths.summary}",
        flush=True,
    )
    return 0 if doc["ok"] else 1
