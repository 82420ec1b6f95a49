"""`vision-graphs`: the ViT captured as CUDA graphs per tile bucket (precision.vision_cuda_graphs) against the
eager ViT at the same buckets, for the sail-vl-2b (InternViT-300M, 21 layers built) and sail-vl2-2b
(AIMv2/SAILViT-Huge, 24 layers) vision towers at real width in bf16.

Per tower, with the ViT trainable (forward + backward) and frozen (forward only): milliseconds per tile with
and without graphs at each bucket, the capture's seconds, and graphed features (and weight gradients) against
the eager ViT at each call's own tile count, a call the graphs pad included. Then the tiny model wrapped in
megatron's DDP, as training runs it: gradients accumulated into main_grad over micro-batches of several tile
counts and a text-only one's blank tile, and a replay after the weights changed in place (as an optimizer
step changes them), each against the eager ViT.

Why on a GPU: CUDA graphs exist only there, and what they cannot capture (RNG state reads, host syncs,
collectives, allocations outside the graph's pool) fails only in a real capture."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List

from sail_megatron.bench.gpu_check.helpers import Figures, attempt, free
from sail_megatron.bench.gpu_check.runner import Part
from sail_megatron.bench.gpu_check.worker import read_figures, worker_command

NAME = "vision-graphs"
TOWERS = ("sail-vl-2b", "sail-vl2-2b")
BUCKETS = (1, 4, 16)
PADDED = 3  # tiles of a call the graphs pad to the next bucket (4)
WARM, TIMED = 2, 5  # passes before and under the clock, per bucket and runner
MAX_REL_L2 = 1e-2
"""Graphed against eager, bf16: the same kernels replayed give the same values; a padded call runs GEMMs of
another row count (other cuBLAS tiles), which moves bf16 results by ~1e-3. A wrong weight, a stale input or
gradients of the wrong replay give ~1."""
DDP_TILES = (3, 5, 1)  # the tiny model's micro-batches under DDP: padded to 5, exact, the blank tile
DDP_BUCKETS = (2, 5, 8)


def rel_l2(reference, other) -> float:
    diff = float((other.float() - reference.float()).norm())
    return diff / max(float(reference.float().norm()), 1e-30)


def grads_rel_l2(reference: List, other: List) -> float:
    """Relative L2 distance of two lists of gradients taken as one vector."""
    num = sum(float((o.float() - r.float()).square().sum()) for r, o in zip(reference, other))
    den = sum(float(r.float().square().sum()) for r in reference)
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def _tower_config(preset: str):
    """The preset with one language layer (the ViT is what this part runs) and no drop path (graphed and eager
    passes then compare exactly; drop path in a graph draws anew on every replay)."""
    from sail_megatron.data.synthetic import IMG_CONTEXT
    from sail_megatron.model.presets import get_preset

    cfg = get_preset(preset)
    cfg.language.num_layers = 1
    cfg.vision.drop_path_rate = 0.0
    cfg.image_context_token_id = IMG_CONTEXT
    return cfg


def _precision(buckets):
    from sail_megatron.config import PrecisionConfig

    return PrecisionConfig(dtype="bf16", vision_tile_buckets=list(buckets), vision_cuda_graphs=True)


def _pixels(cfg, tiles: int, device, seed: int):
    import torch

    size = cfg.vision.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tiles, 3, size, size, generator=g).to(device, torch.bfloat16)


def _pass(runner, vit, pixels, trains: bool):
    """One ViT call (and, trainable, its backward with a fixed output gradient); the features, cloned."""
    import torch

    out = runner(vit, pixels)
    if trains:
        g = torch.Generator(device=out.device).manual_seed(1)
        out.backward(torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype))
    return out.detach().clone()


def _ms_per_tile(runner, vit, pixels, trains: bool) -> float:
    for _ in range(WARM):
        _pass(runner, vit, pixels, trains)
    _sync()
    began = time.perf_counter()
    for _ in range(TIMED):
        _pass(runner, vit, pixels, trains)
    _sync()
    return 1e3 * (time.perf_counter() - began) / TIMED / pixels.shape[0]


def _compare(vit, runner, reference, pixels, trains: bool) -> Dict[str, Any]:
    """Features (and weight gradients) of `runner` against `reference` on the same tiles."""
    params = [p for p in vit.parameters() if p.requires_grad]
    results = []
    for r in (reference, runner):
        vit.zero_grad(set_to_none=True)
        features = _pass(r, vit, pixels, trains)
        results.append((features, [p.grad.detach().clone() for p in params]))
    (f_ref, g_ref), (f_run, g_run) = results
    row = {"features rel L2": rel_l2(f_ref, f_run)}
    if trains:
        row["weight grads rel L2"] = grads_rel_l2(g_ref, g_run)
    row["ok"] = all(v <= MAX_REL_L2 for k, v in row.items() if k.endswith("rel L2"))
    return row


def _vit_linear(vit) -> str:
    return type(vit.decoder.layers[0].self_attention.linear_qkv).__name__


def check_tower(fig: Figures, preset: str, device, timings: List, comparisons: List) -> None:
    from sail_megatron.config import ParallelConfig
    from sail_megatron.model.build import build_model
    from sail_megatron.model.vision_buckets import BucketedTiles, DynamicTiles
    from sail_megatron.model.vision_graphs import GraphedTiles

    cfg = _tower_config(preset)
    model = attempt(
        fig,
        f"{preset}: building the model",
        lambda: build_model(cfg, ParallelConfig(), _precision(BUCKETS), max_tiles=BUCKETS[-1]).to(device).train(),
    )
    if model is None:
        return
    vit = model.vision_model
    fig.figures.setdefault("towers", {})[preset] = {
        "arch": cfg.vision.arch,
        "layers built": len(vit.decoder.layers),
        "hidden": cfg.vision.hidden_size,
        "tokens per tile": cfg.vision.num_positions,
        "linear": _vit_linear(vit),
    }
    for trains in (True, False):
        mode = "trainable, forward + backward" if trains else "frozen, forward"
        for p in vit.parameters():
            p.requires_grad_(trains)
        eager, graphed = BucketedTiles(BUCKETS), GraphedTiles(BUCKETS)

        def capture():
            _sync()
            began = time.perf_counter()
            graphed.capture(vit, _pixels(cfg, 1, device, 0))
            _sync()
            return time.perf_counter() - began

        seconds = attempt(fig, f"{preset} {mode}: capturing the graphs", capture)
        if seconds is None:
            continue
        fig.figures.setdefault("capture seconds", {})[f"{preset} {mode}"] = seconds
        for tiles in (PADDED, BUCKETS[-1]):
            row = attempt(
                fig,
                f"{preset} {mode} {tiles} tiles: graphed vs eager",
                lambda: _compare(vit, graphed, DynamicTiles(), _pixels(cfg, tiles, device, tiles), trains),
            )
            if row is not None:
                comparisons.append({"tower": preset, "mode": mode, "tiles": tiles, **row})
                if not row["ok"]:
                    fig.fail(f"{preset} {mode} {tiles} tiles: graphed ViT differs from the eager one ({row})")
        for tiles in BUCKETS:
            pixels = _pixels(cfg, tiles, device, 100 + tiles)
            ms = attempt(
                fig,
                f"{preset} {mode} {tiles} tiles: timing",
                lambda: {k: _ms_per_tile(r, vit, pixels, trains) for k, r in (("eager", eager), ("graphed", graphed))},
            )
            if ms is not None:
                timings.append(
                    {
                        "tower": preset,
                        "mode": mode,
                        "tiles": tiles,
                        "eager ms/tile": ms["eager"],
                        "graphed ms/tile": ms["graphed"],
                        "speed-up": ms["eager"] / ms["graphed"],
                    }
                )
            fig.save()
        vit.zero_grad(set_to_none=True)
        eager = graphed = None
        free()
    model = vit = None
    free()


def check_ddp(fig: Figures, device) -> Dict[str, Any]:
    """The tiny model under megatron's DDP, eager and graphed ViT over the same micro-batches: the vision
    weights' accumulated main_grad; then a replay after the weights changed in place."""
    import torch

    from sail_megatron.config import ParallelConfig
    from sail_megatron.model.build import build_model
    from sail_megatron.model.vision_buckets import BucketedTiles
    from sail_megatron.model.vision_graphs import GraphedTiles
    from sail_megatron.training.optimizer import wrap_ddp

    cfg = _tower_config("tiny")
    parallel = ParallelConfig()
    model = build_model(cfg, parallel, _precision(DDP_BUCKETS), max_tiles=DDP_BUCKETS[-1]).to(device).train()
    chunk = wrap_ddp(model, parallel)  # parameters now live in DDP's buffers: the graphs capture those
    vision = [p for p in model.vision_model.parameters()]
    batches = [_pixels(cfg, t, device, 7 + t) for t in DDP_TILES]

    def accumulate(runner):
        model.tile_runner = runner
        chunk.zero_grad_buffer()
        for pixels in batches:
            tokens = model.encode_images(pixels)
            (tokens.float() * torch.linspace(-1, 1, tokens.numel(), device=device).view_as(tokens)).sum().backward()
        return [p.main_grad.clone() for p in vision]

    eager, graphed = BucketedTiles(DDP_BUCKETS), GraphedTiles(DDP_BUCKETS)
    row = {
        "linear": _vit_linear(model.vision_model),
        "main_grad rel L2": grads_rel_l2(accumulate(eager), accumulate(graphed)),
    }
    with torch.no_grad():  # what an optimizer step does: new values in the same storage
        for p in vision:
            p.mul_(1.01).add_(1e-3)
    pixels = batches[0]
    row["after an in-place update, features rel L2"] = rel_l2(
        eager(model.vision_model, pixels).detach().clone(), graphed(model.vision_model, pixels).detach().clone()
    )
    row["ok"] = all(v <= MAX_REL_L2 for k, v in row.items() if k.endswith("rel L2"))
    return row


def summarize(timings: List[Dict[str, Any]], comparisons: List[Dict[str, Any]]) -> str:
    ok = sum(bool(r.get("ok")) for r in comparisons)
    speed = [
        f"{r['tower']} {'fwd+bwd' if r['mode'].startswith('trainable') else 'fwd'} {r['tiles']}t "
        f"{r['eager ms/tile']:.2f}->{r['graphed ms/tile']:.2f} ms/tile"
        for r in timings
        if r["tiles"] == BUCKETS[-1]
    ]
    return f"{ok}/{len(comparisons)} graphed-vs-eager checks within rel L2 {MAX_REL_L2}; " + "; ".join(speed)


def worker(fig: Figures, root: Path) -> None:
    from sail_megatron.config import ParallelConfig
    from sail_megatron.platform import destroy_distributed, init_distributed

    device = init_distributed(ParallelConfig(), seed=7).device
    timings: List[Dict[str, Any]] = []
    comparisons: List[Dict[str, Any]] = []
    fig.figures.update({"buckets": list(BUCKETS), "timings": timings, "comparisons": comparisons})
    try:
        ddp = attempt(fig, "tiny model under DDP", lambda: check_ddp(fig, device))
        if ddp is not None:
            comparisons.append({"tower": "tiny (DDP)", "mode": "trainable", **ddp})
            if not ddp["ok"]:
                fig.fail(f"tiny model under DDP: graphed ViT differs from the eager one ({ddp})")
        free()
        for preset in TOWERS:
            check_tower(fig, preset, device, timings, comparisons)
    finally:
        destroy_distributed()
    fig.summary = summarize(timings, comparisons)


def part(timeout_s: float) -> Part:
    return Part(
        NAME,
        "The ViT as CUDA graphs per tile bucket (precision.vision_cuda_graphs) against the eager ViT: ms per "
        f"tile at {', '.join(map(str, BUCKETS))} tiles, trainable (forward + backward) and frozen (forward), "
        "for the sail-vl-2b and sail-vl2-2b vision towers at real width in bf16; graphed features and weight "
        "gradients against eager ones (a padded call included), and the tiny model under megatron's DDP.",
        timeout_s,
        worker_command(NAME),
        read_figures(NAME),
    )
