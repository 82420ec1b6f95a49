"""`torchrun ... -m sail_megatron.bench --config RECIPE.yaml --steps N --warmup W [--data synthetic|real]
[--compare packing|decoder|kernels|layers ...] [--json OUT.json] [--plot OUT.png] [key=value ...]`

Measures training throughput for the recipe (tokens/s per device, samples/s, TFLOP/s and MFU with the
ViT counted, against the bf16 peak and for FP8 runs the FP8 peak too, packing utilization, data wait,
peak memory, a step-time breakdown). Each `--compare` adds two variants measured one after the other
in the same run on the same machine:
  packing   packed THD rows vs one sample per padded row
  decoder   DALI vs PIL image decoding (real data)
  kernels   Triton kernels vs their PyTorch references (needs CUDA)
  layers    Transformer Engine vs megatron-core local layers (needs CUDA and TE; with sequence
            parallelism only the TE layers run)
  vision    the vision encoder whole on every tensor-parallel rank, each encoding its share of the
            images (parallel.vision_parallel=data), vs split over them (tensor); needs TP > 1. Both
            report the bytes each rank hands to collectives per micro-batch, by process group
On the CPU the figures are only good for ratios between variants of one run.

`sail-bench plan --config RECIPE.yaml --gpus N ...` plans a cluster run instead (no GPU, nothing built):
`sail-bench plan --help`.
"""

import argparse
import copy
import dataclasses
import datetime
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from sail_megatron.bench.report import plot, table, write_json
from sail_megatron.config import ConfigError
from sail_megatron.config.train import TrainConfig

# torch, megatron-core and the training stack are imported when a benchmark runs, not at import: `sail-bench
# plan` shares this entry point and must start in a second or two.

logger = logging.getLogger("sail_megatron.bench")

COMPARISONS = ("packing", "decoder", "kernels", "layers", "vision")


def detect_backends():
    from sail_megatron.platform import detect_backends as detect

    return detect()


def _variants(cfg: TrainConfig, compare: List[str], data: str) -> List[Tuple[str, TrainConfig, object, str]]:
    """(name, config, context, why skipped or '') per variant."""
    from sail_megatron.kernels._common import prefer

    backends = detect_backends()
    out = []
    for what in compare:
        a, b = copy.deepcopy(cfg), copy.deepcopy(cfg)
        if what == "packing":
            a.data.packing, b.data.packing = True, False
            out += [("packed", a, nullcontext(), ""), ("padded", b, nullcontext(), "")]
        elif what == "decoder":
            a.data.decoder, b.data.decoder = "dali", "pil"
            why = "" if data == "real" else "decoding happens only with --data real"
            out += [("dali", a, nullcontext(), why), ("pil", b, nullcontext(), why)]
        elif what == "kernels":
            why = "" if backends.cuda else "Triton kernels run compiled only on CUDA"
            out += [("triton-kernels", a, prefer("triton"), why), ("reference-kernels", b, prefer("reference"), why)]
        elif what == "layers":
            a.precision.layers, b.precision.layers = "te", "local"
            why = "" if backends.cuda and backends.transformer_engine else "needs CUDA and Transformer Engine"
            out += [("te-layers", a, nullcontext(), why), ("local-layers", b, nullcontext(), why)]
        elif what == "vision":
            a.parallel.vision_parallel, b.parallel.vision_parallel = "data", "tensor"
            why = "" if cfg.parallel.tensor_model_parallel_size > 1 else "needs parallel.tensor_model_parallel_size > 1"
            out += [("vision-data", a, nullcontext(), why), ("vision-tensor", b, nullcontext(), why)]
    out = out or [("baseline", cfg, nullcontext(), "")]
    return [(name, c, context, why or _layout_problem(c, backends)) for name, c, context, why in out]


def _layout_problem(cfg: TrainConfig, backends) -> str:
    """Why the layout cannot run on this variant's layers (sequence parallelism on local layers), or ''."""
    try:
        cfg.parallel.check_layer_backend(cfg.precision.layer_backend(backends))
    except ConfigError as e:
        return str(e)
    return ""


def _ratios(results: Dict[str, Dict]) -> Dict[str, float]:
    pairs = [
        ("packed", "padded"),
        ("dali", "pil"),
        ("triton-kernels", "reference-kernels"),
        ("te-layers", "local-layers"),
        ("vision-data", "vision-tensor"),
    ]
    out = {}
    for a, b in pairs:
        if a in results and b in results and "skipped" not in results[a] and "skipped" not in results[b]:
            out[f"{a}/{b} tokens_per_s"] = results[a]["tokens_per_s"] / results[b]["tokens_per_s"]
    return out


def _output_problem(path: Optional[str]) -> Optional[str]:
    """Why a results file could not be written there, or None."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        return "is a folder; name a file"
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return f"its folder {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"its folder {parent} is not writable"
    return None


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:
        from sail_megatron.bench.plan import main as plan_main

        return plan_main(argv[1:])
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1].splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=10, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compilation, caches)")
    p.add_argument("--breakdown-steps", type=int, default=3, help="extra timed steps for the breakdown (0: none)")
    p.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    p.add_argument("--compare", action="append", choices=COMPARISONS, default=[])
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="per-device dense bf16/fp16 peak (default: from the GPU name)"
    )
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.breakdown_steps < 0:
        p.error("--steps must be >= 1, --warmup and --breakdown-steps >= 0")
    for flag, out in (("--json", args.json), ("--plot", args.plot)):
        problem = _output_problem(out)
        if problem:
            p.error(f"{flag} {out}: {problem}")  # before minutes of measuring, not after
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error("--peak-tflops must be > 0")
    import torch

    from sail_megatron.bench.measure import BenchSettings, measure
    from sail_megatron.platform import destroy_distributed, init_distributed
    from sail_megatron.training.monitor import device_peak_flops
    from sail_megatron.training.startup import start

    env, cfg, tokenizer = start(args, needs_data=args.data == "real", loads_checkpoints=False)  # random weights
    init_distributed(cfg.parallel, seed=cfg.run.seed)
    try:
        peaks = device_peak_flops(cfg.precision, args.peak_tflops)
        settings = BenchSettings(
            steps=args.steps, warmup=args.warmup, breakdown_steps=args.breakdown_steps, data=args.data, peaks=peaks
        )
        results = {}
        for name, variant, context, why in _variants(cfg, args.compare, args.data):
            if why:
                results[name] = {"skipped": why}
                continue
            if env.is_main:
                logger.info(
                    "measuring %s: %d warmup + %d steps + %d timed", name, args.warmup, args.steps, args.breakdown_steps
                )
            with context:
                results[name] = measure(variant, tokenizer, settings)
        device = (
            torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else f"CPU ({torch.get_num_threads()} threads/rank)"
        )
        doc = {
            "config": args.config,
            "overrides": args.overrides,
            "data": args.data,
            "device": device,
            "world_size": env.world_size,
            "date": datetime.date.today().isoformat(),
            "peak_tflops_per_device": peaks.bf16 / 1e12 if peaks.bf16 else None,
            "peak_tflops_per_device_fp8": peaks.fp8 / 1e12 if peaks.fp8 else None,
            "precision": cfg.precision.dtype,
            "fp8": cfg.precision.fp8,
            "results": results,
            "ratios": _ratios(results),
            "resolved_config": dataclasses.asdict(cfg),
        }
        if env.is_main:
            print(table(results), flush=True)
            for k, v in doc["ratios"].items():
                print(f"{k}: {v:.2f}x", flush=True)
            if args.json:
                write_json(doc, args.json)
            if args.plot:
                plot(doc, args.plot)
    finally:
        destroy_distributed()
