"""Spawned workers for the tile-bucket tests: one model, its micro-batches run with the ViT at each call's own
tile count and again padded to tile buckets; losses, vision and projector gradients and the ViT's call sizes."""

from typing import Dict, List

from sail_megatron.config import ParallelConfig, PrecisionConfig
from sail_megatron.data.synthetic import IMG_CONTEXT
from sail_megatron.model.build import build_model
from sail_megatron.model.presets import get_preset
from sail_megatron.model.vision_buckets import BucketedTiles, DynamicTiles
from sail_megatron.platform import destroy_distributed, init_distributed
from sail_megatron.training.step import run_model
from tests.parallel.vision_workers import _as_layout
from tests.parallel.workers import _data

BUCKETS = (2, 5, 8)
"""Synthetic micro-batches of 2 samples carry 2-8 tiles (one or two images of 1-2 tiles each); a text-only
one runs one blank tile. These buckets pad most calls, the blank tile's included."""
MICRO_BATCHES = 4  # the last one text-only
VISION = ("vision_model.", "projector.")


def _model(preset: str, parallel: ParallelConfig):
    cfg = get_preset(preset)
    cfg.vision.drop_path_rate = 0.0  # drop path draws per tile, blank tiles too: the draws would differ
    cfg.image_context_token_id = IMG_CONTEXT
    return cfg, build_model(cfg, parallel, PrecisionConfig(dtype="fp32")).train()


def _run(model, batches, runner) -> Dict:
    """Forward and backward of every micro-batch with `runner`; the gradients accumulate over them."""
    model.tile_runner = runner
    sizes: List[int] = []
    hook = model.vision_model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    model.zero_grad(set_to_none=True)
    losses = []
    try:
        for b in batches:
            out = run_model(model, b)
            loss = (out.float() * b.loss_mask).sum()
            loss.backward()
            losses.append(float(loss.detach()))
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith(VISION) and p.grad is not None}
    return {"losses": losses, "grads": grads, "vit_calls": sizes}


def _compare(model, batches) -> Dict:
    eager, bucketed = _run(model, batches, DynamicTiles()), _run(model, batches, BucketedTiles(BUCKETS))
    ge, gb = eager["grads"], bucketed["grads"]
    vision = [n for n in ge if n.startswith("vision_model.")]
    return {
        "losses": eager["losses"],
        "loss_diff": max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager["losses"], bucketed["losses"])),
        "same_grad_names": sorted(ge) == sorted(gb),
        "vision_grads": len(vision),
        "vision_grad_norm": float(sum(ge[n].square().sum() for n in vision) ** 0.5) if vision else 0.0,
        "projector_grads": sum(n.startswith("projector.") for n in ge),
        "grad_diff": max(float((gb[n] - ge[n]).abs().max() / (ge[n].abs().max() + 1e-12)) for n in ge),
        "eager_calls": eager["vit_calls"],
        "bucketed_calls": bucketed["vit_calls"],
        "expected_calls": [BucketedTiles(BUCKETS).bucket(t) for t in eager["vit_calls"]],
    }


def _cases(cfg, model, layout: str) -> Dict[str, Dict]:
    """Trainable and frozen ViT over the same micro-batches (the last text-only)."""
    source = _data(cfg).micro_batches(0, 1, MICRO_BATCHES)
    batches = [
        _as_layout(next(source), layout, cfg.tokens_per_tile, text_only=i == MICRO_BATCHES - 1)
        for i in range(MICRO_BATCHES)
    ]
    out = {}
    for trains in (True, False):
        for p in model.vision_model.parameters():
            p.requires_grad_(trains)
        out["trainable" if trains else "frozen"] = _compare(model, batches)
    return out


def single_rank(presets: List[str]) -> Dict[str, Dict]:
    """Each preset on one rank: the ViT sees all of a micro-batch's tiles."""
    init_distributed(ParallelConfig(), seed=5)
    try:
        results = {}
        for preset in presets:
            cfg, model = _model(preset, ParallelConfig())
            results.update({f"{preset} {k}": v for k, v in _cases(cfg, model, "tensor").items()})
        return results
    finally:
        destroy_distributed()


def two_ranks(layout: str) -> Dict[str, Dict]:
    """The tiny model at TP=2 under parallel.vision_parallel=`layout`: "tensor" splits the ViT and every rank
    encodes all tiles; "data" has each rank encode (and pad) its own share of the images."""
    parallel = ParallelConfig(tensor_model_parallel_size=2, vision_parallel=layout)
    init_distributed(parallel, seed=1234)
    try:
        cfg, model = _model("tiny", parallel)
        return _cases(cfg, model, layout)
    finally:
        destroy_distributed()
