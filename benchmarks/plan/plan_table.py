"""The docs table of `sail-bench plan`: every SAIL-VL recipe stage with a budget, planned on 64 and 256 GPUs
(H100 by default, 40% utilization with the ViT counted, the GPU's default link bandwidths), with the picked
layout's communication share of the step, as markdown (docs/benchmarks.md, "Cluster plans").

    python benchmarks/plan/plan_table.py [--gpus 64 256] [--gpu h100] [--mfu 0.4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sail_megatron.bench.plan import plan  # noqa: E402
from sail_megatron.config.counts import format_count  # noqa: E402
from sail_megatron.config.train import load_train_config  # noqa: E402

FAMILIES = ("sail-vl-2b", "sail-vl-8b", "sail-vl-1.5-2b", "sail-vl-1.6-8b", "sail-vl2-moe")
VIT = {"tensor": "", "data": ", ViT DP across TP"}


def _layout(p) -> str:
    recompute = (p["recompute_granularity"] or "none") + (" + ViT" if p["recompute_vision"] else "")
    ep = f" EP{p['ep']}" if p["ep"] > 1 else ""
    vit = VIT[p["vision_parallel"]] if p["tp"] > 1 else ""
    return f"TP{p['tp']} PP{p['pp']}{ep} DP{p['dp']}, {recompute}{vit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--mfu", type=float, default=0.4)
    args = parser.parse_args()
    head = "| recipe | stage | budget | tokens |"
    rule = "| --- | --- | --- | --- |"
    for n in args.gpus:
        head += f" {n} GPUs: picked layout | comm | GPU-hours | days |"
        rule += " --- | --- | --- | --- |"
    print(head)
    print(rule)
    for family in FAMILIES:
        for recipe in sorted((ROOT / "examples" / "configs" / family).glob("[0-9]-*.yaml")):
            row = None
            for n in args.gpus:
                doc = plan(load_train_config(recipe), n, gpu=args.gpu, mfu=args.mfu)
                if row is None:
                    budget = doc["budget"].split(" (run.")[0]
                    row = f"| {family} | {recipe.stem} | {budget} | {format_count(doc['budget_tokens'])} |"
                p = doc["picked"]
                row += (
                    f" {_layout(p)} | {100 * p['comm_fraction']:.1f}% | {p['gpu_hours']:,.0f} | {p['days']:.2f} |"
                    if p
                    else " none fits | - | - | - |"
                )
            print(row, flush=True)


if __name__ == "__main__":
    main()
