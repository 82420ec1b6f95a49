"""`sail-bench plan --config RECIPE.yaml --gpus N [--gpu h100|h200|a100] [--mfu F | --measured REPORT.json]
[--tokens-per-sample T] [--intra-node-gbytes-per-s B] [--inter-node-gbytes-per-s B] [--headroom H] [--json]
[--all] [key=value ...]`

Plans a recipe's stage on N GPUs without building anything (seconds, no GPU, no torch.distributed): every
layout the recipe's own checks accept (tensor parallel 1/2/4/8, pipeline parallel 1/2/4/..., expert parallel
1/2/4/... for mixture-of-experts models, the ViT split over the TP ranks or data-parallel across them, the
micro-batch sizes the data settings allow, recomputation on or off, distributed optimizer on or off), with its memory per
GPU, whether that fits, tokens/s per GPU, communication's share of the step, GPU-hours and days for the
stage's budget; and the layout it would pick, with why. The data's tokens and tiles per sample are those
`sail-data prepare --recipe` measured for data.path when it is here, else a synthetic assumption. What is
exact and what is assumed: docs/design.md, "Planning a cluster run".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Dict, Optional, Sequence

from sail_megatron.bench.plan.communication import OVERLAP_FRACTION, CommunicationModel, Links
from sail_megatron.bench.plan.data import budget_tokens, data_assumption
from sail_megatron.bench.plan.errors import PlanError
from sail_megatron.bench.plan.flops import RowFlops, row_flops
from sail_megatron.bench.plan.gpus import GB, GPUS
from sail_megatron.bench.plan.layouts import candidate_layouts
from sail_megatron.bench.plan.measured_data import measured_statistics
from sail_megatron.bench.plan.memory import MemoryModel
from sail_megatron.bench.plan.model_state import GIB
from sail_megatron.bench.plan.pick import Planned, pick, table_order
from sail_megatron.bench.plan.render import render
from sail_megatron.bench.plan.throughput import (
    DEFAULT_MFU,
    Throughput,
    measured_throughput,
    tokens_per_s_per_gpu,
)
from sail_megatron.config import ConfigError
from sail_megatron.config.train import TrainConfig, load_train_config
from sail_megatron.model.param_count import count_parameters
from sail_megatron.training.flops import peak_flops

DEFAULT_HEADROOM = 0.10


def plan(
    cfg: TrainConfig,
    gpus: int,
    gpu: str = "h100",
    mfu: Optional[float] = None,
    measured: Optional[str] = None,
    tokens_per_sample: Optional[float] = None,
    headroom: float = DEFAULT_HEADROOM,
    config_path: str = "",
    intra_node_gbytes_per_s: Optional[float] = None,
    inter_node_gbytes_per_s: Optional[float] = None,
) -> Dict[str, Any]:
    """The whole plan as a JSON-able document (what --json prints). The link bandwidths default to the
    GPU's (plan/gpus.py)."""
    if gpus < 1:
        raise PlanError("--gpus", f"must be a positive number of GPUs, got {gpus}")
    if gpu not in GPUS:
        raise PlanError("--gpu", f"unknown GPU {gpu!r}; use one of {', '.join(GPUS)}")
    if mfu is not None and not 0 < mfu <= 1:
        raise PlanError("--mfu", f"must be in (0, 1], got {mfu}")
    if tokens_per_sample is not None and not tokens_per_sample > 0:
        raise PlanError("--tokens-per-sample", f"must be > 0, got {tokens_per_sample}")
    if not 0 <= headroom < 1:
        raise PlanError("--headroom", f"must be in [0, 1), got {headroom}")
    for flag, value in (
        ("--intra-node-gbytes-per-s", intra_node_gbytes_per_s),
        ("--inter-node-gbytes-per-s", inter_node_gbytes_per_s),
    ):
        if value is not None and not value > 0:
            raise PlanError(flag, f"must be > 0 (GB/s), got {value}")
    cfg.model.validate()
    cfg.freeze.validate()
    spec = GPUS[gpu]
    peak = peak_flops(spec.device_name, "bf16")
    links = Links(
        spec.intra_node_bytes_per_s if intra_node_gbytes_per_s is None else intra_node_gbytes_per_s * GB,
        spec.inter_node_bytes_per_s if inter_node_gbytes_per_s is None else inter_node_gbytes_per_s * GB,
    )
    data = data_assumption(cfg, *measured_statistics(cfg))
    budget = budget_tokens(cfg, data, tokens_per_sample)
    communication = CommunicationModel(cfg, data, links)
    layouts, refused = candidate_layouts(cfg, gpus)
    if not layouts:
        shown = "; ".join(refused[:2]) + (f"; and {len(refused) - 2} more reasons" if len(refused) > 2 else "")
        raise PlanError("--gpus", f"no layout of this recipe runs on {gpus} GPUs: {shown}")
    if measured is not None:
        speed = measured_throughput(measured, cfg, data, spec, peak, communication)
    else:
        u = DEFAULT_MFU if mfu is None else mfu
        speed = Throughput(
            u,
            peak,
            f"{100 * u:.0f}% of the {spec.name}'s bf16 peak ({peak / 1e12:.0f} TFLOP/s) on the FLOPs a layout "
            "executes (padding and recomputation included)"
            + (" (--mfu)" if mfu is not None else " (the default; --mfu or --measured to change it)"),
        )
    usable = (1 - headroom) * spec.memory_bytes
    memory = MemoryModel(cfg, data)
    flops_by_tp: Dict[int, RowFlops] = {}
    planned = []
    for layout in layouts:
        if layout.tp not in flops_by_tp:
            flops_by_tp[layout.tp] = row_flops(cfg, data, layout.tp)
        flops = flops_by_tp[layout.tp]
        rate, effective, step = tokens_per_s_per_gpu(cfg, data, flops, layout, speed, communication.of(layout))
        hours = budget.tokens / rate / 3600
        m = memory.of(layout)
        planned.append(Planned(layout, m, m.total <= usable, rate, effective, step, hours, hours / gpus / 24))
    chosen, why = pick(planned)
    planned.sort(key=table_order)
    counts = count_parameters(cfg.model)
    reference = flops_by_tp.get(1) or next(iter(flops_by_tp.values()))
    per_token = reference.model.total / data.mean_tokens_per_row
    return {
        "config": config_path,
        "model_preset": cfg.model_preset,
        "moe": cfg.model.language.is_moe,
        "gpus": gpus,
        "gpu": spec.name,
        "gpu_memory_gib": spec.memory_bytes / GIB,
        "headroom": headroom,
        "usable_memory_gib": usable / GIB,
        "precision": cfg.precision.dtype,
        "trainable": list(cfg.freeze.trainable),
        "params_total": counts.total_built,
        "params_by_part": {"vision": counts.vision_built, "projector": counts.projector, "language": counts.language},
        "budget_tokens": budget.tokens,
        "budget": budget.description,
        "data": {k: v for k, v in dataclasses.asdict(data).items() if k != "rows"} | {"description": data.describe()},
        "training_flops_per_token": per_token,
        "vit_flops_share": reference.model.vision / reference.model.total,
        "throughput": {"utilization": speed.utilization, "description": speed.description, "measured": speed.measured},
        "communication": {
            "intra_node_gbytes_per_s": links.intra_node / GB,
            "inter_node_gbytes_per_s": links.inter_node / GB,
            "overlap_grad_reduce": cfg.parallel.overlap_grad_reduce,
            "overlap_param_gather": cfg.parallel.overlap_param_gather,
            "overlap_fraction": OVERLAP_FRACTION,
            "description": _communication_line(cfg, links, intra_node_gbytes_per_s, inter_node_gbytes_per_s),
        },
        "picked": chosen.as_dict() if chosen else None,
        "why": why,
        "layouts": [p.as_dict() for p in planned],
        "left_out": refused,
        "notes": NOTES,
    }


def _communication_line(cfg: TrainConfig, links: Links, intra: Optional[float], inter: Optional[float]) -> str:
    p = cfg.parallel
    overlapped = [
        name
        for name, on in (("gradient reduction", p.overlap_grad_reduce), ("parameter gather", p.overlap_param_gather))
        if on
    ]
    hidden = (
        f"{' and '.join(overlapped)} hidden behind up to {100 * OVERLAP_FRACTION:.0f}% of the compute they overlap"
        if overlapped
        else "data-parallel reductions not overlapped (parallel.overlap_grad_reduce/overlap_param_gather off)"
    )
    return (
        f"NVLink {links.intra_node / GB:g} GB/s inside a node{' (--intra-node-gbytes-per-s)' if intra else ''}, "
        f"{links.inter_node / GB:g} GB/s per GPU between nodes{' (--inter-node-gbytes-per-s)' if inter else ''}, "
        f"8 GPUs a node; ring collectives; TP collectives and pipeline sends not overlapped; {hidden}"
    )


NOTES = [
    "weights, gradients and optimizer state are exact for megatron-core 0.16 (tested against built models); "
    "activations are an estimate for the worst micro-batch (its tokens and data.max_tiles_per_pack tiles)",
    "throughput: one utilization for every layout; recomputation adds executed FLOPs, pipelines wait for their "
    "slowest stage (the first holds the ViT) and fill and drain once per step; TP collectives, expert all-to-alls "
    "and pipeline sends add to the step, DP reductions only beyond what overlaps; latency, load imbalance (experts "
    "included: routing is taken as balanced) and data loading are left out",
    "loader: the micro-batch on the device (tokens and decoded fp32 tiles); rows waiting their turn are in "
    "pinned host memory, and DALI's own GPU buffers are left to the headroom",
]


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        prog="sail-bench plan",
        description="Memory, throughput and time of a recipe's stage on N GPUs, for every layout it allows "
        "(pure arithmetic from the recipe: no GPU, nothing built).",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="the stage's recipe (YAML)")
    p.add_argument("--gpus", required=True, type=int, help="GPUs in the job")
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--mfu", type=float, default=None, help=f"assumed utilization, (0, 1] (default {DEFAULT_MFU})")
    speed.add_argument("--measured", default=None, help="a `sail-bench --json` report whose MFU to carry over")
    p.add_argument(
        "--tokens-per-sample",
        type=float,
        default=None,
        help="mean tokens per sample of the real data (converts a samples budget; default: the mean "
        "`sail-data prepare --recipe` measured for data.path, else the synthetic one)",
    )
    p.add_argument(
        "--intra-node-gbytes-per-s",
        type=float,
        default=None,
        metavar="GB/S",
        help="NVLink bandwidth between two GPUs of a node, one direction, in gigabytes/s (default: the GPU's: "
        + ", ".join(f"{k} {g.intra_node_bytes_per_s / GB:g}" for k, g in GPUS.items())
        + ")",
    )
    p.add_argument(
        "--inter-node-gbytes-per-s",
        type=float,
        default=None,
        metavar="GB/S",
        help="network bandwidth between nodes per GPU, one direction, in gigabytes/s (400 Gb/s InfiniBand is 50; "
        "default: " + ", ".join(f"{k} {g.inter_node_bytes_per_s / GB:g}" for k, g in GPUS.items()) + ")",
    )
    p.add_argument(
        "--headroom", type=float, default=DEFAULT_HEADROOM, help="share of GPU memory kept free (default 0.1)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--all", action="store_true", help="list every layout, not the first dozen")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, as for sail-train")
    args = p.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        doc = plan(
            cfg,
            args.gpus,
            gpu=args.gpu.lower(),
            mfu=args.mfu,
            measured=args.measured,
            tokens_per_sample=args.tokens_per_sample,
            headroom=args.headroom,
            config_path=args.config,
            intra_node_gbytes_per_s=args.intra_node_gbytes_per_s,
            inter_node_gbytes_per_s=args.inter_node_gbytes_per_s,
        )
    except PlanError as e:
        p.error(str(e))
    except ConfigError as e:
        print(f"sail-bench plan: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(doc, indent=2) if args.json else render(doc, show_all=args.all), flush=True)
