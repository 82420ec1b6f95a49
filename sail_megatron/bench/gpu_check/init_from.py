"""`init-from`: a checkpoint written on the CPU (CUDA hidden, megatron-core's local layers) loads into
Transformer Engine layers on the GPU through `load_checkpoint`, the code `run.init_from` uses, and gives the
CPU's logits. One model per family plus the small real-width ones.

Two workers: `write-cpu-checkpoint` runs in a subprocess with CUDA hidden and writes a checkpoint and fp32
reference logits per model; `init-from` starts it, then loads each checkpoint into TE layers and compares."""

from __future__ import annotations

import os
import shutil
import subprocess
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
from sail_megatron.bench.gpu_check.runner import Part, free_port
from sail_megatron.bench.gpu_check.worker import read_figures, worker_argv, worker_command

NAME = "init-from"
WRITER = "write-cpu-checkpoint"
FAMILIES = {
    "tiny": "InternViT + Qwen2.5",
    "tiny-aimv2": "AIMv2 + Qwen2.5",
    "tiny-sail-vl2": "AIMv2 + Qwen3",
    "sail-vl-2b-small": "InternViT + Qwen2.5, real widths",
    "sail-vl2-2b-small": "AIMv2 + Qwen3, real widths",
}


def positions_every(name: str) -> int:
    """Logits kept for every n-th position: the small models' vocabulary makes all of them hundreds of MB."""
    return 1 if name.startswith("tiny") else 8


def _checkpoints(fig: Figures) -> Path:
    return fig.path.parent / "cpu-checkpoint"


def writer(fig: Figures, root: Path) -> None:
    """CUDA hidden: local layers in bf16 on the CPU write a checkpoint per model, plus reference logits. The
    logits come from an fp32 copy of the same weights: more exact, and fast on any CPU (bf16 matrix multiplies
    are slow on CPUs without bf16 instructions)."""
    import torch

    from sail_megatron.config import ParallelConfig, PrecisionConfig
    from sail_megatron.model.build import build_model
    from sail_megatron.platform import destroy_distributed, init_distributed
    from sail_megatron.training.checkpoint import save_checkpoint

    if torch.cuda.is_available():
        raise RuntimeError("the CPU writer must run with CUDA hidden (CUDA_VISIBLE_DEVICES='')")
    parallel = ParallelConfig()
    init_distributed(parallel, seed=4321)
    references = {}
    try:
        for name, cfg in check_models(list(FAMILIES)).items():
            model = build_model(cfg, parallel, PrecisionConfig(dtype="bf16", layers="local")).eval()
            directory = _checkpoints(fig) / name
            shutil.rmtree(directory, ignore_errors=True)
            save_checkpoint(directory, 1, [model], common={"written_by": "gpu-check CPU writer"})
            exact = build_model(cfg, parallel, PrecisionConfig(dtype="fp32", layers="local")).eval()
            exact.load_state_dict(model.state_dict())
            every = positions_every(name)
            references[name] = {
                kind: logits(exact, batch, torch.device("cpu"), every).to(torch.bfloat16)
                for kind, batch in check_batches(cfg).items()
            }
            fig.figures[name] = {"linear class": linear_class(model), "checkpoint": str(directory)}
            del model, exact
            free()
    finally:
        destroy_distributed()
    torch.save(references, _checkpoints(fig) / "reference_logits.pt")
    fig.summary = "written"


def _write_on_the_cpu(fig: Figures, root: Path) -> bool:
    began = time.perf_counter()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "MASTER_PORT": str(free_port())}
    run = subprocess.run(worker_argv(WRITER, fig.path.parent / f"{WRITER}.json", root), env=env, cwd=root)
    fig.figures["CPU writer (s)"] = time.perf_counter() - began
    if run.returncode != 0:
        fig.fail(f"the CPU writer (CUDA hidden) exited with {run.returncode}")
    return run.returncode == 0


def worker(fig: Figures, root: Path) -> None:
    import torch

    from sail_megatron.config import ParallelConfig, PrecisionConfig
    from sail_megatron.model.build import build_model
    from sail_megatron.platform import destroy_distributed, init_distributed
    from sail_megatron.training.checkpoint import load_checkpoint

    if not _write_on_the_cpu(fig, root):
        return
    base = _checkpoints(fig)
    references = torch.load(base / "reference_logits.pt")
    parallel = ParallelConfig()
    device = init_distributed(parallel, seed=1).device
    rows: List[Dict[str, Any]] = []
    fig.figures["comparisons"] = rows
    try:
        for name, cfg in check_models(list(FAMILIES)).items():

            def load():
                te = build_model(cfg, parallel, PrecisionConfig(dtype="bf16", layers="te")).to(device).eval()
                return te, load_checkpoint(base / name, [te])  # what run.init_from does

            loaded = attempt(fig, f"{name}: loading the CPU checkpoint into TE layers", load)
            if loaded is None:
                rows.append({"model": name, "family": FAMILIES[name], "ok": False})
                continue
            te, info = loaded
            for kind, batch in check_batches(cfg).items():
                every = positions_every(name)
                result = attempt(
                    fig,
                    f"{name} {kind}",
                    lambda: compare_logits(references[name][kind], logits(te, batch, device, every).cpu()),
                )
                if result is None:
                    rows.append({"model": name, "family": FAMILIES[name], "batch": kind, "ok": False})
                    continue
                rows.append(
                    {
                        "model": name,
                        "family": FAMILIES[name],
                        "batch": kind,
                        "loaded into": linear_class(te),
                        "iteration": info["iteration"],
                        **result,
                    }
                )
                if not result["ok"]:
                    fig.fail(
                        f"{name} {kind}: the CPU-written checkpoint in TE layers gives logits "
                        f"{result['rel_l2']:.3g} (rel L2) from the CPU's"
                    )
                fig.save()
            te = loaded = None
            free()
    finally:
        destroy_distributed()
    shutil.rmtree(base, ignore_errors=True)
    fig.summary = comparison_summary(rows, "CPU-vs-TE logit comparisons")


def part(timeout_s: float) -> Part:
    return Part(
        NAME,
        "`run.init_from` across layer backends: a checkpoint written with local layers on the CPU (CUDA hidden) "
        "loaded into TE layers on the GPU through the same loading code; its logits against the CPU's. Models: "
        "InternViT + Qwen2.5, AIMv2 + Qwen2.5 and AIMv2 + Qwen3 (tiny), and the small sail-vl-2b- and "
        "sail-vl2-2b-shaped ones.",
        timeout_s,
        worker_command(NAME),
        read_figures(NAME),
        needs_te=True,
    )
