"""`moe-experts`: megatron-core's grouped-GEMM experts on Transformer Engine (TEGroupedMLP, what
`precision.layers=te` builds for Qwen3-MoE) against its local experts (SequentialMLP: one pair of linears per
expert, run one after another) on the same weights, moved over through a checkpoint. It compares the model's
bf16 logits and, per MoE layer, the output and gradients for one input, and times forward + backward of both.
Models: the tiny Qwen3-MoE preset, and sail-vl2-moe's language model at its real widths (hidden 2048, 128
experts of width 768, top 8) with 2 layers behind the tiny ViT.

Each MoE layer is also run on its own because both routers then get the same input and pick the same experts
(the same fp32 router GEMM and top-k). Only the experts' GEMMs differ, so the tolerance can be tight. Through
the whole model the layers before an MoE layer already differ by bf16 rounding, and a token whose 8th and 9th
expert scores are that close changes experts, so the logits get the `layers` part's looser bound (0.05). At
real widths 7-8% of the tokens change experts in each layer between bf16 and fp32 (measured on the CPU), and
the logits still differ by only 0.019."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from sail_megatron.bench.gpu_check.helpers import (
    MAX_REL_L2,
    Figures,
    attempt,
    check_batches,
    check_models,
    compare_logits,
    free,
    linear_class,
    logits,
)
from sail_megatron.bench.gpu_check.runner import Part
from sail_megatron.bench.gpu_check.worker import read_figures, worker_command

NAME = "moe-experts"
MODELS = ("tiny-sail-vl2-moe", "sail-vl2-moe-small")
# megatron-core 0.16's experts on TE's GroupedLinear. Its other classes: GroupedMLP (the legacy grouped GEMM,
# chosen when TE lacks GroupedLinear) and SequentialMLP (local layers).
GROUPED = "TEGroupedMLP"
# One MoE layer, same input and routing: at real widths, bf16 is 0.43-0.48% (rel L2) from fp32 in the output
# and in every gradient, worst expert included (measured on the CPU). Two bf16 paths that round in different
# places differ by at most ~1.4x that, 0.7%: 0.02 leaves a ~3x margin. An expert's weights in another expert's
# slot give ~1 for that expert.
MAX_LAYER_REL_L2 = 0.02
TOKENS = 4096  # through each MoE layer, and per timed model step (ROWS text rows)
ROWS = 4
WARMUP, STEPS = 2, 5


def moe_layers(model) -> List[Any]:
    """The decoder layers' MoELayers."""
    return [layer.mlp for layer in model.language_model.decoder.layers]


def experts_class(model) -> str:
    return type(moe_layers(model)[0].experts).__name__


def check_experts(model, expected: str) -> None:
    found = experts_class(model)
    if found != expected:
        raise RuntimeError(
            f"the model's experts are {found}, not {expected}: with precision.layers=te megatron-core builds "
            "TE's grouped GEMM only when Transformer Engine has GroupedLinear and moe_grouped_gemm is set"
        )


def expert_weights(experts, fc: str) -> List[Any]:
    """Each expert's weight of `fc` (linear_fc1 or linear_fc2), in expert order: SequentialMLP holds one MLP
    per expert, TEGroupedMLP one TE GroupedLinear with weight0 .. weight{E-1}."""
    if hasattr(experts, "local_experts"):
        return [getattr(e, fc).weight for e in experts.local_experts]
    linear = getattr(experts, fc)
    return [getattr(linear, f"weight{i}") for i in range(experts.num_local_experts)]


def grad_of(p):
    """A parameter's gradient: megatron's DDP (and fused weight-gradient accumulation) keep it in
    `main_grad`; zeros when it has none, so a missing gradient shows as a zero norm."""
    import torch

    g = getattr(p, "main_grad", None)
    g = p.grad if g is None else g
    return torch.zeros_like(p) if g is None else g


def rel_l2(reference, other) -> float:
    diff = other.float() - reference.float()
    return float(diff.norm() / reference.float().norm().clamp_min(1e-30))


def layer_pass(moe, x, grad_out):
    """One forward and backward of an MoE layer: (output, input gradient); the weights' gradients land in
    their buffers."""
    x = x.detach().requires_grad_()
    out, _ = moe(x)
    out.backward(grad_out)
    return out.detach(), x.grad


def compare_moe_layers(reference, other, chunks: Sequence, device, tokens: int = TOKENS, seed: int = 0):
    """Per MoE layer, the same random input and output gradient through both models' layers: relative L2
    differences of the output, the input, router and (worst expert's) expert weight gradients."""
    import torch

    hidden = reference.model_config.language.hidden_size
    dtype = next(reference.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index, (a, b) in enumerate(zip(moe_layers(reference), moe_layers(other))):
        x, grad_out = (torch.randn(tokens, 1, hidden, generator=generator).to(device, dtype) for _ in range(2))
        for chunk in chunks:
            chunk.zero_grad_buffer()
        (out_a, dx_a), (out_b, dx_b) = layer_pass(a, x, grad_out), layer_pass(b, x, grad_out)
        diffs = {
            "output rel_l2": rel_l2(out_a, out_b),
            "input grad rel_l2": rel_l2(dx_a, dx_b),
            "router grad rel_l2": rel_l2(grad_of(a.router.weight), grad_of(b.router.weight)),
        }
        norms = [float(dx_a.float().norm()), float(grad_of(a.router.weight).float().norm())]
        for fc in ("linear_fc1", "linear_fc2"):
            pairs = list(zip(expert_weights(a.experts, fc), expert_weights(b.experts, fc)))
            diffs[f"{fc} grad rel_l2 (worst expert)"] = max(rel_l2(grad_of(p), grad_of(q)) for p, q in pairs)
            norms.append(sum(float(grad_of(p).float().norm()) for p, _ in pairs))
        zero = not all(n > 0 for n in norms)  # nothing to compare: equal, but not a pass
        ok = max(diffs.values()) <= MAX_LAYER_REL_L2 and not zero
        rows.append({"layer": index, **diffs, "zero gradients": zero, "ok": ok})
    return rows


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms_per_step(step: Callable[[], Any], device, warmup: int = WARMUP, steps: int = STEPS) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return 1000 * (time.perf_counter() - began) / steps


def time_pair(models: Dict[str, Any], chunks: Dict[str, Any], device, tokens: int = TOKENS, **timing):
    """Forward + backward of the first MoE layer alone and of the whole model on ROWS text rows, each model
    in turn (training mode): a row per what was timed, ms per step and tokens/s per model."""
    import torch

    from sail_megatron.data.synthetic import FIRST_TEXT_ID

    first = next(iter(models.values()))
    cfg = first.model_config.language
    generator = torch.Generator().manual_seed(1)
    dtype = next(first.parameters()).dtype
    x, grad_out = (torch.randn(tokens, 1, cfg.hidden_size, generator=generator).to(device, dtype) for _ in range(2))
    ids = torch.randint(FIRST_TEXT_ID, cfg.vocab_size, (ROWS, tokens // ROWS), generator=generator).to(device)
    positions = torch.arange(tokens // ROWS, device=device).expand(ROWS, -1)

    def model_step(model, chunk):
        chunk.zero_grad_buffer()
        model(ids, positions, None, pixel_values=None, labels=ids.roll(-1, dims=1)).float().mean().backward()

    timed = {
        "MoE layer 0": lambda model, chunk: layer_pass(moe_layers(model)[0], x, grad_out),
        "model step": model_step,
    }
    rows = []
    for what, step in timed.items():
        row: Dict[str, Any] = {"timed": what, "tokens": ROWS * (tokens // ROWS) if what == "model step" else tokens}
        for label, model in models.items():
            ms = ms_per_step(lambda: step(model, chunks[label]), device, **timing)
            row[f"{label} ms"], row[f"{label} tokens/s"] = ms, row["tokens"] / ms * 1000
        labels = list(models)
        row[f"{labels[1]} speed-up"] = row[f"{labels[0]} ms"] / row[f"{labels[1]} ms"]
        rows.append(row)
    return rows


def build_pair(cfg, parallel, device, directory: Path, other: str = "te", dtype: str = "bf16"):
    """(local, other): a model with local layers, and its weights in `other` layers through a checkpoint."""
    from sail_megatron.config import PrecisionConfig
    from sail_megatron.model.build import build_model
    from sail_megatron.training.checkpoint import load_checkpoint, save_checkpoint

    shutil.rmtree(directory, ignore_errors=True)
    local = build_model(cfg, parallel, PrecisionConfig(dtype=dtype, layers="local")).to(device)
    save_checkpoint(directory, 0, [local])
    model = build_model(cfg, parallel, PrecisionConfig(dtype=dtype, layers=other)).to(device)
    load_checkpoint(directory, [model])
    shutil.rmtree(directory, ignore_errors=True)
    return local, model


def check_model(
    fig: Figures,
    name: str,
    cfg,
    parallel,
    device,
    rows: List[Dict[str, Any]],
    timings: List[Dict[str, Any]],
    other: str = "te",
    dtype: str = "bf16",
    expected: str = GROUPED,
    tokens: int = TOKENS,
    **timing,
) -> None:
    """One model through the whole part: build both, check the experts' class, compare, time. Failures are
    recorded in `fig` and in the rows. The CPU tests run it with other="local" (a second local copy)."""
    from sail_megatron.training.optimizer import wrap_ddp

    def build():
        local, model = build_pair(cfg, parallel, device, fig.path.parent / f"{NAME}-{name}", other, dtype)
        check_experts(model, expected)
        return local, model

    built = attempt(fig, f"{name}: building the local and {other} models", build)
    if built is None:
        rows.append({"model": name, "ok": False})
        return
    local, model = built
    labels = {"local": local, "TE" if other == "te" else f"{other} copy": model}
    fig.figures.setdefault("experts", {})[name] = " vs ".join(
        f"{experts_class(m)} ({linear_class(m)})" for m in labels.values()
    )
    # Logits on the padded batch only: the packed row adds flex_attention's compile time, and `layers` runs it.
    batch = check_batches(cfg)["padded"]
    for m in labels.values():
        m.eval()
    result = attempt(
        fig, f"{name} logits", lambda: compare_logits(logits(local, batch, device), logits(model, batch, device))
    )
    rows.append({"model": name, "compared": "logits", **(result or {"ok": False})})
    if result and not result["ok"]:
        fig.fail(f"{name}: logits differ by {result['rel_l2']:.3g} (rel L2 > {MAX_REL_L2})")
    for m in labels.values():
        m.train()
    chunks = {label: wrap_ddp(m, parallel) for label, m in labels.items()}  # as training does: main_grad
    layers = attempt(
        fig, f"{name} MoE layers", lambda: compare_moe_layers(local, model, list(chunks.values()), device, tokens)
    )
    if layers is None:
        rows.append({"model": name, "compared": "MoE layers", "ok": False})
    for row in layers or []:
        rows.append({"model": name, "compared": f"MoE layer {row['layer']}", **row})
        if not row["ok"]:
            fig.fail(
                f"{name} MoE layer {row['layer']}: output or gradients differ (rel L2 > {MAX_LAYER_REL_L2}, or zero)"
            )
    fig.save()
    timed = attempt(fig, f"{name} timing", lambda: time_pair(labels, chunks, device, tokens, **timing))
    timings.extend({"model": name, **row} for row in timed or [])
    fig.save()


def summarize(rows: List[Dict[str, Any]], timings: List[Dict[str, Any]]) -> str:
    ok = sum(bool(r.get("ok")) for r in rows)
    text = (
        f"{ok}/{len(rows)} TE-vs-local expert comparisons passed (logits rel L2 <= {MAX_REL_L2}, "
        f"each MoE layer <= {MAX_LAYER_REL_L2})"
    )
    layer = [t for t in timings if t["timed"] == "MoE layer 0" and "TE ms" in t]
    if layer:
        t = layer[-1]
        text += f"; {t['model']} MoE layer fwd+bwd: local {t['local ms']:.1f} ms, TE {t['TE ms']:.1f} ms ({t['TE speed-up']:.1f}x)"
    return text


def worker(fig: Figures, root: Path) -> None:
    from sail_megatron.config import ParallelConfig
    from sail_megatron.platform import destroy_distributed, init_distributed

    parallel = ParallelConfig()  # expert parallelism 1: every expert on this GPU
    device = init_distributed(parallel, seed=1234).device
    rows: List[Dict[str, Any]] = []
    timings: List[Dict[str, Any]] = []
    fig.figures.update(comparisons=rows, timings=timings)
    try:
        for name, cfg in check_models(MODELS).items():
            check_model(fig, name, cfg, parallel, device, rows, timings)
            free()
    finally:
        destroy_distributed()
    fig.summary = summarize(rows, timings)


def part(timeout_s: float) -> Part:
    return Part(
        NAME,
        "megatron-core's TE grouped-GEMM experts (TEGroupedMLP) vs its local experts (SequentialMLP) on the same "
        "weights: bf16 logits, each MoE layer's output and gradients, and forward+backward time. Models: the "
        "tiny Qwen3-MoE and sail-vl2-moe's language model at real widths (128 experts, top 8) with 2 layers.",
        timeout_s,
        worker_command(NAME),
        read_figures(NAME),
        needs_te=True,
    )
