"""`fp8-vision`: the ViT and projector forward and backward under Transformer Engine FP8
(precision.fp8_vision) with a trainable ViT, on micro-batches of several tile counts and on a text-only one
(no images: the ViT runs on the model's blank tile), for both vision architectures at tiny and at real widths.

Why on a GPU: Hopper's FP8 GEMMs take only the TN layout, so the forward GEMM and both backward GEMMs (data
and weight gradient) each need the ViT's token count to be a multiple of 16 (32 for MXFP8); the model meets that
by running InternViT's odd 1025-token tiles packed, with a pad segment (model/tile_layout.py). This part runs those shapes for real and records the tokens that entered the ViT."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List

from sail_megatron.bench.gpu_check.helpers import Figures, attempt, check_models, free
from sail_megatron.bench.gpu_check.runner import Part
from sail_megatron.bench.gpu_check.worker import read_figures, worker_command

NAME = "fp8-vision"
MODELS = ("tiny", "sail-vl-2b-small", "tiny-aimv2", "sail-vl2-2b-small")
# Tiles per micro-batch: a lone tile, odd counts, a whole multiple of 8 and one more than multiples of 8 and 16
# (blank tiles pad those again); 0 is the text-only micro-batch.
TILE_COUNTS = (1, 3, 8, 9, 17, 0)
TEXT_TOKENS = 64  # the text-only micro-batch's length (a multiple of 16: the language model runs FP8 too)
TOKEN_MULTIPLE = 16  # what Hopper's FP8 GEMMs need of the token count (reported; TE itself refuses the rest)


def fp8_precision():
    from sail_megatron.config import PrecisionConfig

    return PrecisionConfig(dtype="bf16", layers="te", fp8="hybrid", fp8_vision=True)


def case_label(tiles: int) -> str:
    return f"{tiles} tiles" if tiles else "text only"


def _grad(p):
    """A parameter's gradient: megatron's DDP (and TE's fused weight-gradient accumulation) keep it in
    `main_grad`; a bare module in `grad`."""
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def grad_stats(params: Iterable) -> Dict[str, Any]:
    """Over the trainable parameters: how many, how many have no gradient or a non-finite one, the norm."""
    count = missing = nonfinite = 0
    square = 0.0
    for p in params:
        if not p.requires_grad:
            continue
        count += 1
        g = _grad(p)
        if g is None:
            missing += 1
            continue
        g = g.float()
        if not bool(g.isfinite().all()):
            nonfinite += 1
            continue
        square += float(g.square().sum())
    return {"params": count, "missing": missing, "nonfinite": nonfinite, "norm": math.sqrt(square)}


def judge_case(row: Dict[str, Any]) -> List[str]:
    """What is wrong with one case's row (empty: it passed). With images, the ViT's and the projector's
    gradients must be finite and non-zero; text-only, the blank tile's term is multiplied by zero, so every
    vision parameter must get a finite gradient, which is zero."""
    problems = []
    if not row["output finite"]:
        problems.append("non-finite output")
    if not math.isfinite(row["loss"]):
        problems.append(f"loss {row['loss']}")
    for part in ("vision", "projector"):
        stats = row[f"{part} grads"]
        if stats["nonfinite"]:
            problems.append(f"{stats['nonfinite']} {part} gradients non-finite")
        if stats["missing"]:
            problems.append(f"{stats['missing']} of {stats['params']} {part} parameters got no gradient")
        if row["tiles"] and not stats["norm"] > 0:
            problems.append(f"{part} gradients are all zero")
    return problems


def _count_vit_tokens(vision_model, seen: List[int]):
    """Records the tokens (sequence x tiles, padding included) of every call of the ViT's transformer block."""

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        seen.append(int(x.shape[0] * x.shape[1]))

    return vision_model.decoder.register_forward_pre_hook(hook, with_kwargs=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(model, tiles: int, device, seed: int = 0) -> Dict[str, Any]:
    """One forward and backward: the ViT and projector on `tiles` random tiles (loss: mean square of the
    vision tokens), or with tiles=0 the whole model on a text-only row (loss: mean next-token loss). The
    caller zeroes the gradients before."""
    import torch

    from sail_megatron.data.synthetic import FIRST_TEXT_ID

    cfg = model.model_config
    generator = torch.Generator().manual_seed(seed + tiles)
    dtype = next(model.parameters()).dtype
    seen: List[int] = []
    handle = _count_vit_tokens(model.vision_model, seen)
    _sync(device)
    began = time.perf_counter()
    try:
        if tiles:
            size = cfg.vision.image_size
            pixels = torch.randn(tiles, 3, size, size, generator=generator).to(device, dtype)
            out = model.encode_images(pixels)
            loss = out.float().square().mean()
        else:
            tokens = torch.randint(FIRST_TEXT_ID, cfg.language.vocab_size, (1, TEXT_TOKENS), generator=generator)
            tokens = tokens.to(device)
            positions = torch.arange(TEXT_TOKENS, device=device)[None]
            out = model(tokens, positions, None, pixel_values=None, labels=tokens.roll(-1, dims=1))
            loss = out.float().mean()
        loss.backward()
        _sync(device)
    finally:
        handle.remove()
    tokens_in = sum(seen)
    return {
        "tiles": tiles,
        "case": case_label(tiles),
        "ViT tokens": tokens_in,
        f"ViT tokens % {TOKEN_MULTIPLE}": tokens_in % TOKEN_MULTIPLE,
        "seconds": time.perf_counter() - began,
        "output finite": bool(torch.isfinite(out.float()).all()),
        "loss": float(loss),
        "vision grads": grad_stats(model.vision_model.parameters()),
        "projector grads": grad_stats(model.projector.parameters()),
    }


def _report_row(name: str, row: Dict[str, Any], problems: List[str]) -> Dict[str, Any]:
    """The row as the report shows it: flat figures, the gradient norms."""
    shown = {k: v for k, v in row.items() if k not in ("vision grads", "projector grads")}
    return {
        "model": name,
        **shown,
        "vision grad norm": row["vision grads"]["norm"],
        "projector grad norm": row["projector grads"]["norm"],
        "ok": not problems,
    }


def summarize(rows: List[Dict[str, Any]]) -> str:
    ok = sum(bool(r.get("ok")) for r in rows)
    counted = [r[f"ViT tokens % {TOKEN_MULTIPLE}"] for r in rows if f"ViT tokens % {TOKEN_MULTIPLE}" in r]
    aligned = sum(m == 0 for m in counted)
    return (
        f"{ok}/{len(rows)} FP8 ViT+projector forward/backward cases passed (finite, vision gradients "
        "non-zero with images); "
        f"ViT tokens a multiple of {TOKEN_MULTIPLE} in {aligned}/{len(counted)}"
    )


def check_model(fig: Figures, name: str, cfg, parallel, precision, device, rows: List[Dict[str, Any]]) -> None:
    """Every micro-batch of TILE_COUNTS through one model, a row each; failures recorded in `fig`."""
    from sail_megatron.model.build import build_model
    from sail_megatron.training.optimizer import wrap_ddp

    def build():
        model = build_model(cfg, parallel, precision).to(device).train()
        return model, wrap_ddp(model, parallel)  # as training does: gradients land in main_grad

    built = attempt(fig, f"{name}: building the model", build)
    if built is None:
        rows.append({"model": name, "ok": False})
        return
    model, chunk = built
    layout = model.vision_model.layout  # packed tiles (InternViT) or a batch of tiles (AIMv2)
    fig.figures.setdefault("ViT layout", {})[name] = {"packed": layout.packed, "token multiple": layout.token_multiple}
    for tiles in TILE_COUNTS:
        chunk.zero_grad_buffer()
        row = attempt(fig, f"{name} {case_label(tiles)}", lambda: run_case(model, tiles, device))
        if row is None:
            rows.append({"model": name, "case": case_label(tiles), "ok": False})
            continue
        problems = judge_case(row)
        rows.append(_report_row(name, row, problems))
        if problems:
            fig.fail(f"{name} {case_label(tiles)}: {'; '.join(problems)}")
        fig.save()


def worker(fig: Figures, root: Path) -> None:
    from sail_megatron.config import ParallelConfig
    from sail_megatron.platform import destroy_distributed, init_distributed

    parallel, precision = ParallelConfig(), fp8_precision()
    device = init_distributed(parallel, seed=7).device
    rows: List[Dict[str, Any]] = []
    fig.figures["precision"] = {"fp8": precision.fp8, "recipe": precision.fp8_recipe, "fp8_vision": True}
    fig.figures["cases"] = rows
    try:
        for name, cfg in check_models(MODELS).items():
            check_model(fig, name, cfg, parallel, precision, device, rows)
            free()
    finally:
        destroy_distributed()
    fig.summary = summarize(rows)


def part(timeout_s: float) -> Part:
    return Part(
        NAME,
        "The ViT and projector forward and backward in Transformer Engine FP8 (precision.fp8=hybrid, "
        "fp8_vision), ViT trainable: the tiny InternViT and AIMv2 models and the small sail-vl-2b- and "
        "sail-vl2-2b-shaped ones, on micro-batches of 1, 3, 8, 9 and 17 tiles and a text-only one.",
        timeout_s,
        worker_command(NAME),
        read_figures(NAME),
        needs_te=True,
    )
