"""`train-bf16` and `train-fp8`: `sail-bench` on the SAIL-VL-2B SFT recipe (every part trained) on synthetic
packed rows: tokens/s, TFLOP/s and MFU with the ViT counted, peak memory, the step-time breakdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sail_megatron.bench.gpu_check.report import fmt
from sail_megatron.bench.gpu_check.runner import Context, Part

BENCH_RECIPE = "examples/configs/sail-vl-2b/3-sft-knowledge.yaml"
# One step = 4 packed rows of 4096 tokens (global batch 4 on one GPU): a few seconds per variant.
BENCH_ARGS = ("--steps", "5", "--warmup", "3", "--breakdown-steps", "1")
BENCH_OVERRIDES = ("data.seq_length=4096", "run.global_batch_size=4")


def build_tokenizer(ctx: Context) -> Tuple[Optional[Path], str]:
    """The demo tokenizer (a few seconds): sail-bench needs one, and synthetic rows need no more. Built once,
    before the parts run; (path, "") or (None, the error)."""
    try:
        from sail_megatron.data.demo_dataset import DEMO_VOCAB_SIZE, demo_texts
        from sail_megatron.data.tokenizer import build_demo_tokenizer

        path = ctx.work / "tokenizer"
        build_demo_tokenizer(demo_texts(), path, vocab_size=DEMO_VOCAB_SIZE)
        return path, ""
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def bench_figures(doc: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    """The headline figures of a `sail-bench --json` document (its first measured variant)."""
    name, r = next(((n, v) for n, v in doc.get("results", {}).items() if "skipped" not in v), (None, None))
    if r is None:
        return {"skipped": {n: v.get("skipped") for n, v in doc.get("results", {}).items()}}, "no variant was measured"
    step = r.get("step_time_s", {})
    figures = {
        "variant": name,
        "device": doc.get("device"),
        "precision": doc.get("precision"),
        "fp8": doc.get("fp8"),
        "layers": doc.get("resolved_config", {}).get("precision", {}).get("layers"),
        "step time median (s)": step.get("median"),
        "tokens/s per GPU": r.get("tokens_per_s_per_device"),
        "samples/s": r.get("samples_per_s"),
        "tiles/s": r.get("tiles_per_s"),
        "TFLOP/s per GPU (ViT counted)": r.get("tflops_per_s_per_device"),
    }
    for key, label in (
        ("mfu", "MFU vs bf16 peak"),
        ("mfu_fp8", "MFU vs FP8 peak"),
        ("mfu_vs_bf16_peak", "MFU vs bf16 peak (older field)"),
    ):
        if r.get(key) is not None:
            figures[label] = r[key]
    figures.update(
        {
            "packing utilization": r.get("packing_utilization"),
            "data wait share": r.get("data_wait_frac"),
            "peak memory (GiB)": r.get("peak_memory_gib"),
            "final loss": r.get("final_loss"),
        }
    )
    if r.get("breakdown_s_per_step"):
        figures["breakdown (ms/step)"] = {k: 1000 * v for k, v in r["breakdown_s_per_step"].items()}
    mfu = r.get("mfu") if r.get("mfu") is not None else r.get("mfu_vs_bf16_peak")
    summary = (
        f"{fmt(r.get('tokens_per_s_per_device'))} tok/s/GPU, {fmt(r.get('tflops_per_s_per_device'))} TFLOP/s, "
        f"MFU {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'}"
    )
    if r.get("mfu_fp8") is not None:
        summary += f" ({100 * r['mfu_fp8']:.1f}% of the FP8 peak)"
    return figures, summary


def bench_part(name: str, title: str, overrides: Sequence[str], timeout_s: float, needs_te: bool) -> Part:
    def command(ctx: Context) -> List[str]:
        if ctx.tokenizer is None:
            raise RuntimeError("no tokenizer: building the demo tokenizer failed (see the environment section)")
        return [
            ctx.python,
            "-m",
            "sail_megatron.bench",
            "--config",
            BENCH_RECIPE,
            *BENCH_ARGS,
            "--json",
            str(ctx.figures_path(name)),
            f"data.tokenizer={ctx.tokenizer}",
            *BENCH_OVERRIDES,
            *overrides,
        ]

    def collect(ctx: Context, log: str) -> Tuple[Dict[str, Any], str]:
        path = ctx.figures_path(name)
        if not path.is_file():
            return {}, ""
        return bench_figures(json.loads(path.read_text()))

    return Part(name, title, timeout_s, command, collect, needs_te=needs_te)


def train_bf16(timeout_s: float) -> Part:
    return bench_part(
        "train-bf16",
        f"sail-bench on {BENCH_RECIPE} (SAIL-VL-2B, every part trained), bf16, packed rows "
        "of 4096 tokens, global batch 4.",
        (),
        timeout_s,
        needs_te=False,
    )


def train_fp8(timeout_s: float) -> Part:
    return bench_part(
        "train-fp8",
        "The same with Transformer Engine FP8 (precision.fp8=hybrid, delayed scaling) in the language model.",
        ("precision.fp8=hybrid",),
        timeout_s,
        needs_te=True,
    )
