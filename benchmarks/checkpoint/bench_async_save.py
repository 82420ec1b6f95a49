"""How long a checkpoint save stalls the step loop, synchronous vs `run.async_save`, side by side.

Trains a ~130M-parameter model (the tiny recipe widened: language hidden 768, 12 layers, FFN 2048,
32,000-row vocabulary; fp32 weights and Adam moments, ~1.6 GB of checkpoint) for 6 steps on the demo
data in one process, saving at steps 2 and 4, once with synchronous writes and once in the background,
and prints what the trainer logs: the step loop's wait at each save, the step times and the total wall
time. Needs the demo data (`make demo` or `sail-data demo --out demo_data`).

    python benchmarks/checkpoint/bench_async_save.py [--demo demo_data] [--workdir /tmp/sail-async-bench]
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WIDE = [
    "model.language.hidden_size=768",
    "model.language.num_layers=12",
    "model.language.num_attention_heads=12",
    "model.language.num_query_groups=4",
    "model.language.ffn_hidden_size=2048",
    "model.language.vocab_size=32000",
]


def run(demo: Path, save_dir: Path, async_save: bool, port: int):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(port),
        "-m", "sail_megatron.train", "--config", str(ROOT / "examples/configs/tiny/3-sft-knowledge.yaml"),
        "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
        f"data.tokenizer={demo / 'raw' / 'tokenizer'}", f"data.path={demo / 'sft'}", f"run.save_dir={save_dir}",
        "run.init_from=null", "run.global_batch_size=2", "run.train_steps=6", "run.save_interval=2",
        "run.keep_last=1", "run.plot=false", "run.tensorboard=false", f"run.async_save={str(async_save).lower()}",
        *WIDE,
    ]  # fmt: skip
    began = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - began
    if out.returncode:
        sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
    log = out.stdout + out.stderr
    waits = [float(w) for w in re.findall(r"the step loop waited ([\d.]+) s", log)]
    steps = [json.loads(line)["step_time_s"] for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    size = sum(f.stat().st_size for f in (save_dir / "iter_00000006").rglob("*") if f.is_file())
    return waits, steps, wall, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=ROOT / "demo_data")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sail-async-bench"))
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    results = {}
    for name, async_save, port in (("sync", False, 29731), ("async", True, 29732)):
        results[name] = run(args.demo.resolve(), args.workdir / name, async_save, port)
    print(f"{'writes':<8}{'wait at save 2':>16}{'wait at save 4':>16}{'step 3 (after save 2)':>24}{'wall':>8}")
    for name, (waits, steps, wall, size) in results.items():
        print(f"{name:<8}{waits[0]:>15.2f}s{waits[1]:>15.2f}s{steps[2]:>23.2f}s{wall:>7.0f}s")
    (sync_first, sync_later), (async_first, async_later) = results["sync"][0][:2], results["async"][0][:2]
    print(
        f"checkpoint {results['sync'][3] / 1e9:.2f} GB; stall ratio sync/async: {sync_first / async_first:.1f}x at "
        f"the first save (it also plans the layout), {sync_later / async_later:.1f}x at the next (steady state)"
    )
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
