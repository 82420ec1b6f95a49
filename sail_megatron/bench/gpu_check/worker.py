"""The worker protocol. A part that runs Python code of ours starts
`python -m sail_megatron.bench.gpu_check worker NAME OUT.json --root ROOT`; the worker writes its figures,
one-line summary and failures to OUT.json as it goes (a timeout keeps what was done), and the part reads them
back when it ends."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from sail_megatron.bench.gpu_check.runner import Context

PROG = "python -m sail_megatron.bench.gpu_check worker"


def worker_argv(name: str, out: Path, root: Path, python: str = sys.executable) -> List[str]:
    return [python, "-m", "sail_megatron.bench.gpu_check", "worker", name, str(out), "--root", str(root)]


def worker_command(name: str, out: Optional[Path] = None) -> Callable[[Context], List[str]]:
    """A part's command: worker `name` writing to `out` (default: the part's figures file)."""
    return lambda ctx: worker_argv(name, out or ctx.figures_path(name), ctx.root, ctx.python)


def read_figures(name: str) -> Callable[[Context, str], Tuple[Dict[str, Any], str]]:
    """A part's collect: (figures with the failures added, summary) from the worker's JSON file."""

    def collect(ctx: Context, log: str) -> Tuple[Dict[str, Any], str]:
        path = ctx.figures_path(name)
        if not path.is_file():
            return {}, ""
        doc = json.loads(path.read_text())
        figures = dict(doc.get("figures", {}))
        if doc.get("failures"):
            figures["failures"] = doc["failures"]
        return figures, doc.get("summary", "")

    return collect


def worker_main(argv: Sequence[str]) -> int:
    from sail_megatron.bench.gpu_check.helpers import Figures
    from sail_megatron.bench.gpu_check.parts import WORKERS

    p = argparse.ArgumentParser(prog=PROG)
    p.add_argument("name", choices=sorted(WORKERS))
    p.add_argument("out", type=Path)
    p.add_argument("--root", type=Path, default=Path.cwd())
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    fig = Figures(args.out)
    try:
        WORKERS[args.name](fig, args.root.resolve())
    except Exception:
        traceback.print_exc()
        fig.failures.append(traceback.format_exc(limit=-3).strip().splitlines()[-1])
        fig.save()
        return 1
    fig.save()
    return 1 if fig.failures else 0
