"""`memory-model`: the memory `sail-bench plan` plans (bench/plan/model_state.py) against what torch allocates on
the GPU, for SAIL-VL-2B with every part trained at micro-batch 1 (the SFT recipe's layout on one GPU),
training on synthetic packed rows.

Two comparisons: the model state after the first optimizer step (weights, gradient buffers, optimizer
state: exact in the planner, so any difference is something the planner misses on a GPU, e.g. Transformer
Engine's own buffers) and the peak of the steps (`torch.cuda.max_memory_allocated`) against the planner's
total, whose activations are an estimate. The planner's figures are for the largest micro-batch the steps
ran (its tiles) and, beside them, for the worst case it plans with (data.max_tiles_per_pack tiles)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from sail_megatron.bench.gpu_check.runner import Part
from sail_megatron.bench.gpu_check.worker import read_figures, worker_command

NAME = "memory-model"
RECIPE = "examples/configs/sail-vl-2b/3-sft-knowledge.yaml"
# Two packed rows of 4096 tokens per step on one GPU; the step count is enough to reach the steady peak
# (the optimizer state exists from the first step on).
OVERRIDES = ("data.seq_length=4096", "run.global_batch_size=2")
STEPS = 3
GIB = 2**30


def load_recipe(root: Path):
    """The recipe the part measures, with the synthetic data's <IMG_CONTEXT> id."""
    from sail_megatron.config.train import load_train_config
    from sail_megatron.data.synthetic import IMG_CONTEXT

    cfg = load_train_config(root / RECIPE, OVERRIDES)
    cfg.model.image_context_token_id = IMG_CONTEXT
    return cfg


def planned(cfg, tiles_per_row: Optional[int] = None) -> Dict[str, float]:
    """The planner's memory for the recipe's own layout on one GPU, in GiB (no GPU needed)."""
    from sail_megatron.bench.plan.data import data_assumption
    from sail_megatron.bench.plan.layouts import recipe_layout
    from sail_megatron.bench.plan.memory import MemoryModel

    memory = MemoryModel(cfg, data_assumption(cfg)).of(recipe_layout(cfg, 1), tiles_per_row)
    split = memory.split_gib()
    return {**split, "state": split["weights"] + split["grads"] + split["optimizer"], "total": memory.total / GIB}


def error_percent(measured: float, estimate: float) -> Optional[float]:
    """(measured - estimate) / estimate, in percent: positive when the planner plans too little."""
    return None if not estimate else 100 * (measured - estimate) / estimate


def compare(measured: Dict[str, float], plan_seen: Dict[str, float], plan_worst: Dict[str, float]) -> Dict[str, Any]:
    """The part's figures from the measured GiB (`state`, `peak`) and the planner's."""
    return {
        "model state (GiB): measured after the first step": measured["state"],
        "model state (GiB): planned (exact part)": plan_seen["state"],
        "model state error (%)": error_percent(measured["state"], plan_seen["state"]),
        "peak (GiB): max_memory_allocated": measured["peak"],
        "peak (GiB): planned for the largest micro-batch run": plan_seen["total"],
        "peak error (%)": error_percent(measured["peak"], plan_seen["total"]),
        "activations (GiB): peak - state, measured": measured["peak"] - measured["state"],
        "activations (GiB): planned": plan_seen["activations"] + plan_seen["loader"],
        "planned split (GiB)": {k: plan_seen[k] for k in ("weights", "grads", "optimizer", "activations", "loader")},
        "peak (GiB): planned worst case (max_tiles_per_pack tiles)": plan_worst["total"],
    }


def summarize(figures: Dict[str, Any]) -> str:
    state, peak = figures["model state error (%)"], figures["peak error (%)"]
    return (
        f"peak {figures['peak (GiB): max_memory_allocated']:.2f} GiB measured vs "
        f"{figures['peak (GiB): planned for the largest micro-batch run']:.2f} planned ({peak:+.1f}%); model state "
        f"{figures['model state (GiB): measured after the first step']:.2f} vs "
        f"{figures['model state (GiB): planned (exact part)']:.2f} ({state:+.1f}%)"
    )


def worker(fig, root: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("the memory-model part measures GPU memory and needs a CUDA GPU")
    from sail_megatron.bench.synthetic_rows import SyntheticRows, rows_config
    from sail_megatron.platform import destroy_distributed, init_distributed
    from sail_megatron.training.flops import Trains
    from sail_megatron.training.metered_data import MeteredData
    from sail_megatron.training.startup import build_training
    from sail_megatron.training.step import train_step

    cfg = load_recipe(root)
    device = init_distributed(cfg.parallel, seed=cfg.run.seed).device
    tiles, held = [], [0]
    try:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        chunks, optimizer, scheduler = build_training(cfg, device)
        fig.figures["after build (GiB)"] = (torch.cuda.memory_allocated() - before) / GIB

        def rows():
            for batch, lengths in SyntheticRows(rows_config(cfg, seed=cfg.run.seed), device):
                tiles.append(batch.num_tiles)
                # This generator holds the last batch between steps: not model state.
                held[0] = sum(t.numel() * t.element_size() for t in vars(batch).values() if torch.is_tensor(t))
                yield batch, lengths

        data = MeteredData(rows(), cfg.model, Trains.from_freeze(cfg.freeze), cfg.parallel.tensor_model_parallel_size)
        num_micro = cfg.num_microbatches(1)
        state = None
        for step in range(STEPS):
            train_step(chunks, optimizer, scheduler, data, num_micro, cfg.data.seq_length, cfg.data.micro_batch_size)
            torch.cuda.synchronize()
            if step == 0:
                state = (torch.cuda.memory_allocated() - before - held[0]) / GIB
        measured = {"state": state, "peak": (torch.cuda.max_memory_allocated() - before) / GIB}
    finally:
        destroy_distributed()
    figures = compare(measured, planned(cfg, max(tiles)), planned(cfg))
    figures["micro-batches run"] = len(tiles)
    figures["tiles per micro-batch (max)"] = max(tiles)
    fig.figures.update(figures)
    fig.summary = summarize(figures)
    fig.save()


def part(timeout_s: float) -> Part:
    return Part(
        NAME,
        f"`sail-bench plan`'s memory model against the GPU: {RECIPE} (SAIL-VL-2B, every part trained) at "
        f"micro-batch 1, {STEPS} steps of 2 packed rows of 4096 tokens; model state after the first step and "
        "max_memory_allocated, each beside the planner's figure and the error.",
        timeout_s,
        worker_command(NAME),
        read_figures(NAME),
    )
