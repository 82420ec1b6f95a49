#!/usr/bin/env python
"""`sail-data index`'s peak memory against the number of shards: the same samples per shard, 4 to 256 shards,
each indexed into a --meta folder in a fresh process, its peak resident memory read from the kernel
(getrusage of the finished child: the largest of the index process and energon's preparation subprocess).
Prints a table; nothing is asserted.

  python benchmarks/data/bench_index_memory.py [--shards 4 32 256] [--per-shard 20] [--side 64]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import build  # noqa: E402


def _peak_of_child(cmd) -> float:
    """MiB: ru_maxrss of the largest child reaped so far is all getrusage gives, so run each in a fresh
    interpreter that reports its own children's peak."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, nargs="+", default=[4, 32, 256])
    p.add_argument("--per-shard", type=int, default=20)
    p.add_argument("--side", type=int, default=64)
    args = p.parse_args(argv)
    print(f"{'shards':>7}{'samples':>9}{'index s':>9}{'peak MiB':>10}")
    for n in args.shards:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            build(root, n * args.per_shard, args.per_shard, args.side)
            cmd = [
                sys.executable,
                "-m",
                "sail_megatron.data.cli",
                "index",
                str(root / "crawl"),
                "--meta",
                str(root / "meta"),
            ]
            began = time.perf_counter()
            peak = _peak_of_child(cmd)
            print(f"{n:>7}{n * args.per_shard:>9}{time.perf_counter() - began:>9.1f}{peak:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
