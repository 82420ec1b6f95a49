"""`layers`: Transformer Engine layers against megatron-core's local layers on the same weights, by bf16
logits, for both architecture pairs at tiny and at real widths, on a padded batch and on a packed THD row."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Dict, List

from sail_megatron.bench.gpu_check.helpers import (
    Figures,
    attempt,
    check_batches,
    check_models,
    compare_logits,
    comparison_summary,
    free,
    linear_class,
    logits,
)
from sail_megatron.bench.gpu_check.runner import Part
from sail_megatron.bench.gpu_check.worker import read_figures, worker_command

NAME = "layers"
MODELS = ("tiny", "tiny-sail-vl2", "sail-vl-2b-small", "sail-vl2-2b-small")


def worker(fig: Figures, root: Path) -> None:
    from sail_megatron.config import ParallelConfig, PrecisionConfig
    from sail_megatron.model.build import build_model
    from sail_megatron.platform import destroy_distributed, init_distributed
    from sail_megatron.training.checkpoint import load_checkpoint, save_checkpoint

    parallel = ParallelConfig()
    device = init_distributed(parallel, seed=1234).device
    rows: List[Dict[str, Any]] = []
    fig.figures["comparisons"] = rows
    try:
        for name, cfg in check_models(MODELS).items():
            directory = fig.path.parent / f"layers-{name}"
            shutil.rmtree(directory, ignore_errors=True)

            def build_both():
                # Same weights through a checkpoint: the TE layers' names and fused norms differ from local ones.
                local = build_model(cfg, parallel, PrecisionConfig(dtype="bf16", layers="local")).to(device).eval()
                save_checkpoint(directory, 0, [local])
                te = build_model(cfg, parallel, PrecisionConfig(dtype="bf16", layers="te")).to(device).eval()
                load_checkpoint(directory, [te])
                if not linear_class(te).startswith("TE"):
                    raise RuntimeError(f"the TE model was built with {linear_class(te)}")
                return local, te

            models = attempt(fig, f"{name}: building the local and TE models", build_both)
            if models is None:
                continue
            local, te = models
            for kind, batch in check_batches(cfg).items():
                began = time.perf_counter()
                result = attempt(
                    fig,
                    f"{name} {kind}",
                    lambda: compare_logits(logits(local, batch, device), logits(te, batch, device)),
                )
                if result is None:
                    rows.append({"model": name, "batch": kind, "ok": False})
                    continue
                rows.append(
                    {
                        "model": name,
                        "batch": kind,
                        "layers": f"{linear_class(local)} vs {linear_class(te)}",
                        **result,
                        "seconds": time.perf_counter() - began,
                    }
                )
                if not result["ok"]:
                    fig.fail(f"{name} {kind}: TE vs local logits differ by {result['rel_l2']:.3g} (rel L2)")
                fig.save()
            shutil.rmtree(directory, ignore_errors=True)
            local = te = models = None
            free()
    finally:
        destroy_distributed()
    fig.summary = comparison_summary(rows, "TE-vs-local logit comparisons")


def part(timeout_s: float) -> Part:
    return Part(
        NAME,
        "Transformer Engine vs megatron-core local layers on the same weights (bf16 logits): the tiny "
        "InternViT + Qwen2 and AIMv2 + Qwen3 models, a small sail-vl-2b-shaped one (ViT 2 of 5 layers, LM 2 "
        "layers, real widths and vocabulary) and a small sail-vl2-2b-shaped one (SAILViT-Huge 3 layers, "
        "Qwen3-1.7B 2 layers), on a padded batch and on a packed THD row.",
        timeout_s,
        worker_command(NAME),
        read_figures(NAME),
        needs_te=True,
    )
