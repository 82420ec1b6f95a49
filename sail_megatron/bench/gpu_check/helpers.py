"""What the workers share: the figures file, the models and batches they check, logits and their comparison."""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

# Logit agreement: bf16 against bf16 computed another way (other GEMMs, fused norms, flash attention) stays
# near 1e-2 relative L2; a weight loaded into the wrong place gives ~1. Top-1 agreement is reported, not
# judged: randomly initialised models have near-uniform logits, so ties flip on rounding alone.
MAX_REL_L2 = 0.05


class Figures:
    """A worker's results, rewritten to its JSON file after every item so a timeout keeps what was done."""

    def __init__(self, path: Path):
        self.path, self.figures, self.summary, self.failures = Path(path), {}, "", []

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(
            json.dumps(
                {"figures": self.figures, "summary": self.summary, "failures": self.failures}, indent=1, default=str
            )
        )

    def fail(self, what: str) -> None:
        print(f"FAILED: {what}", flush=True)
        self.failures.append(what)
        self.save()


def _preset(name: str, vision_layers: int = 0, language_layers: int = 0):
    """A preset's ModelConfig, optionally with fewer layers (0: as the preset has them)."""
    from sail_megatron.model.presets import get_preset

    cfg = get_preset(name)
    cfg.vision.num_layers = vision_layers or cfg.vision.num_layers
    cfg.language.num_layers = language_layers or cfg.language.num_layers
    return cfg


def _sail_vl2_moe_small():
    """sail-vl2-moe's language model at its real widths (hidden 2048, 128 experts of width 768, top 8, the
    real vocabulary) with 2 layers, behind the tiny AIMv2 ViT: the experts at full size, built in seconds."""
    cfg = _preset("sail-vl2-moe", language_layers=2)
    cfg.vision = _preset("tiny-sail-vl2-moe").vision
    return cfg


# The models the workers check, by name. Both architecture pairs: the tiny presets, a small sail-vl-2b-shaped
# model (every width, head count and the vocabulary of the real one, 2 of 5 ViT layers built as select_layer
# -4 does, 2 language layers) and a small sail-vl2-2b-shaped one (SAILViT-Huge widths with 3 layers,
# Qwen3-1.7B widths with 2 layers: TE's fused RMSNorm+linear in the ViT, q/k norms, head_dim 128, tied
# embeddings); and the Qwen3-MoE ones, tiny and with sail-vl2-moe's real-width experts.
MODELS: Dict[str, Callable[[], Any]] = {
    "tiny": lambda: _preset("tiny"),  # InternViT + Qwen2.5
    "tiny-aimv2": lambda: _preset("tiny-aimv2"),  # AIMv2 + Qwen2.5 (SAIL-VL-1.5/1.6)
    "tiny-sail-vl2": lambda: _preset("tiny-sail-vl2"),  # AIMv2 + Qwen3 (SAIL-VL2)
    "tiny-sail-vl2-moe": lambda: _preset("tiny-sail-vl2-moe"),  # AIMv2 + Qwen3-MoE
    "sail-vl-2b-small": lambda: _preset("sail-vl-2b", 5, 2),
    "sail-vl2-2b-small": lambda: _preset("sail-vl2-2b", 3, 2),
    "sail-vl2-moe-small": _sail_vl2_moe_small,
}


def check_models(names: Sequence[str]) -> Dict[str, Any]:
    """name -> a fresh ModelConfig, with the synthetic data's <IMG_CONTEXT> id."""
    from sail_megatron.data.synthetic import IMG_CONTEXT

    models = {name: MODELS[name]() for name in names}
    for cfg in models.values():
        cfg.image_context_token_id = IMG_CONTEXT
    return models


def check_batches(cfg) -> Dict[str, Any]:
    """A padded batch of two samples and one packed THD row of three, each with one image of 1-2 tiles."""
    from sail_megatron.data.batch import Batch
    from sail_megatron.data.synthetic import PAD, SyntheticConfig, SyntheticImageCaptions

    image_block = 2 + 2 * cfg.tokens_per_tile
    seq = 64 * math.ceil((image_block + 100) / 64)
    src = SyntheticImageCaptions(
        SyntheticConfig(
            seq_length=seq,
            micro_batch_size=1,
            image_size=cfg.vision.image_size,
            tokens_per_tile=cfg.tokens_per_tile,
            vocab_size=cfg.language.vocab_size,
            max_images=1,
            max_tiles_per_image=2,
            seed=11,
        )
    )
    padded = Batch.collate([src.sample(0), src.sample(1)])
    samples = [src.sample(i) for i in (2, 3, 4)]
    lengths = [min(int((s.tokens != PAD).sum()) + 1, seq) for s in samples]
    return {"padded": padded, "packed": Batch.pack(samples, lengths)}


def logits(model, batch, device, every: int = 1):
    """[positions, vocab] logits of the batch (every `every`-th position of each row), fp32."""
    import torch

    from sail_megatron.training.step import packed_seq_params

    b = batch.to(device)
    with torch.no_grad():
        out = model(b.tokens, b.position_ids, None, pixel_values=b.pixel_values, packed_seq_params=packed_seq_params(b))
    vocab = model.model_config.language.vocab_size
    return out[:, ::every, :vocab].reshape(-1, vocab).float()


def compare_logits(reference, other) -> Dict[str, Any]:
    diff = other.float() - reference.float()
    rel = float(diff.norm() / reference.float().norm().clamp_min(1e-30))
    top1 = float((other.argmax(-1) == reference.argmax(-1)).float().mean())
    return {"rel_l2": rel, "max_abs": float(diff.abs().max()), "top1_agree": top1, "ok": rel <= MAX_REL_L2}


def comparison_summary(rows: List[Dict[str, Any]], what: str) -> str:
    worst = max((r["rel_l2"] for r in rows if "rel_l2" in r), default=float("nan"))
    return f"{sum(bool(r.get('ok')) for r in rows)}/{len(rows)} {what} within rel L2 {MAX_REL_L2} (worst {worst:.3g})"


def linear_class(model) -> str:
    return type(model.language_model.decoder.layers[0].self_attention.linear_qkv).__name__


def free() -> None:
    """Give back the memory of models the caller has just deleted."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attempt(fig: Figures, what: str, fn: Callable[[], Any]) -> Any:
    """fn(), or None with the failure recorded: one broken model or batch does not stop the others."""
    try:
        return fn()
    except Exception:
        traceback.print_exc()
        fig.fail(f"{what}: {traceback.format_exc(limit=-1).strip().splitlines()[-1]}")
        return None
