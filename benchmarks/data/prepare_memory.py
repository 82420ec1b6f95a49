#!/usr/bin/env python
"""Peak memory and throughput of `sail-data prepare` at input sizes 10x apart: peak RSS must stay flat.

Every record points at the same uncompressed 512x512 BMP (about 0.8 MB), so each image read ahead of the
writer costs real memory. Each size runs in a fresh process that reports its own peak RSS (energon's
indexing runs in a subprocess of its own and is not counted) and its CPU time.

  python benchmarks/data/prepare_memory.py [--sizes 100 1000] [--workers 2] [--unbounded]

--unbounded replays the old read-ahead (ThreadPoolExecutor.map submits every record at once) for comparison.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _child(src: Path, images: Path, out: Path, workers: int, unbounded: bool) -> None:
    from sail_megatron.data import prepare as prepare_module

    if unbounded:
        prepare_module.bounded_map = lambda pool, fn, items, window: pool.map(fn, items)
    energon = {"s": 0.0}
    run_energon = prepare_module.run_energon_prepare

    def timed_energon(*args, **kwargs):
        t = time.perf_counter()
        run_energon(*args, **kwargs)
        energon["s"] = time.perf_counter() - t

    prepare_module.run_energon_prepare = timed_energon
    start, cpu0 = time.perf_counter(), os.times()
    report = prepare_module.prepare(src, images, out, workers=workers, shard_size=100, progress=False)
    wall, cpu1 = time.perf_counter() - start, os.times()
    self_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    print(
        json.dumps(
            {
                "written": report.written,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "wall_s": wall,
                "energon_s": energon["s"],
                "cpu_s": self_cpu,
            }
        )
    )


def _measure(root: Path, n: int, workers: int, unbounded: bool) -> dict:
    images = root / "images"
    src = root / f"in{n}.jsonl"
    record = {
        "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Noise."}],
        "image": "big.bmp",
    }
    src.write_text("".join(json.dumps({**record, "id": str(i)}) + "\n" for i in range(n)))
    out = root / f"out{n}"
    cmd = [sys.executable, __file__, "--child", str(src), str(images), str(out), str(workers)]
    if unbounded:
        cmd.append("--unbounded")
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--unbounded", action="store_true", help="the old read-ahead, for comparison")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        src, images, out, workers = args.child
        _child(Path(src), Path(images), Path(out), int(workers), args.unbounded)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        pixels = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / "big.bmp", "BMP")
        size_mb = (root / "images" / "big.bmp").stat().st_size / 1e6
        mode = "unbounded (Executor.map)" if args.unbounded else f"bounded (window {4 * args.workers})"
        print(f"image {size_mb:.2f} MB per record, {args.workers} workers, read-ahead {mode}")
        print(
            f"{'records':>8} {'peak RSS MB':>12} {'wall s':>8} {'shards s':>9} {'samples/s':>10} {'samples/CPU-s':>14}"
        )
        for n in args.sizes:
            f = _measure(root, n, args.workers, args.unbounded)
            shards_s = f["wall_s"] - f["energon_s"]
            print(
                f"{f['written']:8d} {f['peak_rss_mb']:12.0f} {f['wall_s']:8.2f} {shards_s:9.2f} "
                f"{f['written'] / shards_s:10.0f} {f['written'] / f['cpu_s']:14.0f}"
            )
        print(
            "shards s: the prepare process without energon's indexing subprocess; samples/CPU-s: samples per "
            "second of one core (user + system time of the prepare process)"
        )


if __name__ == "__main__":
    main()
