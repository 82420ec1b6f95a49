"""Single-rank checks of the built model (spawned, so megatron-core's state stays out of pytest)."""

import torch

from sail_megatron.config import ParallelConfig, PrecisionConfig
from sail_megatron.data.synthetic import IMG_CONTEXT
from sail_megatron.model.build import build_model
from sail_megatron.model.presets import get_preset
from sail_megatron.platform import destroy_distributed, init_distributed


def _tiny(select_layer: int = -1):
    init_distributed(ParallelConfig(), seed=5)
    cfg = get_preset("tiny")
    cfg.vision.select_layer = select_layer
    cfg.image_context_token_id = IMG_CONTEXT
    return cfg, build_model(cfg, ParallelConfig(), PrecisionConfig(dtype="fp32")).eval()


def structure_and_masks() -> dict:
    cfg, model = _tiny()
    try:
        out = {"vision_layers": len(model.vision_model.decoder.layers)}
        # Language attention is causal: a change at position t moves logits at t.. only.
        ids = torch.randint(16, 500, (1, 32))
        pos = torch.arange(32)[None]
        with torch.no_grad():
            base = model(ids, pos, None)
            changed = ids.clone()
            changed[0, 20] = (changed[0, 20] + 1) % 500 + 16
            moved = model(changed, pos, None)
        diff = (moved - base).abs().amax(-1)[0]
        out["causal_before"] = float(diff[:20].max())
        out["causal_after"] = float(diff[20:].min())
        # Vision attention is bidirectional: the last patch influences the first.
        pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
        with torch.no_grad():
            v0 = model.vision_model(pixels)
            pixels[..., -14:, -14:] += 1.0
            v1 = model.vision_model(pixels)
        out["vision_first_patch_moves"] = float((v1[0, 0] - v0[0, 0]).abs().max())
        # Layer scale 0 makes every ViT layer the identity: output = patch + position embeddings.
        with torch.no_grad():
            for layer in model.vision_model.decoder.layers:
                layer.ls1.zero_()
                layer.ls2.zero_()
            vm = model.vision_model
            emb = vm.patch_embedding(pixels).flatten(2).transpose(1, 2) + vm.position_embedding[:, 1:]
            out["identity_error"] = float((vm(pixels) - emb).abs().max())
        return out
    finally:
        destroy_distributed()


def select_layer_count(select_layer: int) -> int:
    _, model = _tiny(select_layer)
    try:
        return len(model.vision_model.decoder.layers)
    finally:
        destroy_distributed()


def frozen_vision_builds_no_graph() -> dict:
    cfg, model = _tiny()
    try:
        model.train()
        for p in model.vision_model.parameters():
            p.requires_grad_(False)
        pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
        tokens = model.encode_images(pixels)
        tokens.sum().backward()
        return {
            "shape": tuple(tokens.shape),
            "projector_grad": all(p.grad is not None for p in model.projector.parameters()),
            "vision_grad": any(p.grad is not None for p in model.vision_model.parameters()),
        }
    finally:
        destroy_distributed()


def checkpoint_keys() -> list:
    """The dist_checkpointing keys of the local-spec model (what a checkpoint written on the CPU holds)."""
    _, model = _tiny()
    try:
        return sorted(v.key for v in model.sharded_state_dict().values() if hasattr(v, "key"))
    finally:
        destroy_distributed()


def stage_dtypes(dtype: str) -> list:
    init_distributed(ParallelConfig(), seed=5)
    try:
        cfg = get_preset("tiny")
        cfg.image_context_token_id = IMG_CONTEXT
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(dtype=dtype))
        return sorted({str(p.dtype) for p in model.parameters()})
    finally:
        destroy_distributed()


def text_only_batch_reaches_every_vision_parameter() -> dict:
    """A micro-batch without tiles still gives every vision and projector weight a gradient (zero),
    and the same loss as without the vision side."""
    cfg, model = _tiny()
    try:
        model.train()
        ids = torch.randint(16, 500, (1, 24))
        pos = torch.arange(24)[None]
        blank = torch.empty(0, 3, cfg.vision.image_size, cfg.vision.image_size)
        out = model(ids, pos, None, pixel_values=blank)
        out.float().sum().backward()
        vision = [(n, p) for n, p in model.named_parameters() if n.startswith(("vision_model.", "projector."))]
        with torch.no_grad():
            text_only = model.language_model(input_ids=ids, position_ids=pos, attention_mask=None)
        return {
            "all_have_grad": all(p.grad is not None for _, p in vision),
            "grads_zero": all(float(p.grad.abs().max()) == 0.0 for _, p in vision),
            "same_output": float((out - text_only).abs().max()),
        }
    finally:
        destroy_distributed()


def packed_tiles_match_batched_tiles(preset: str, tiles: int) -> dict:
    """The ViT's packed layout (tiles as THD segments plus a pad segment: InternViT under FP8) against its
    batched layout on the same weights: features and every vision gradient, drop path included."""
    from sail_megatron.model.tile_layout import TileLayout

    init_distributed(ParallelConfig(), seed=5)
    cfg = get_preset(preset)
    if cfg.vision.arch == "internvit":  # AIMv2 has no stochastic depth
        cfg.vision.drop_path_rate = 0.5
    cfg.image_context_token_id = IMG_CONTEXT
    try:
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(dtype="fp32")).train()
        vit = model.vision_model
        pixels = torch.randn(tiles, 3, cfg.vision.image_size, cfg.vision.image_size)
        runs = {}
        for name, layout in (("batched", vit.layout), ("packed", TileLayout(cfg.vision.num_positions, 16))):
            vit.layout = layout
            vit.zero_grad(set_to_none=True)
            torch.manual_seed(11)  # the same drop-path draws
            features = vit(pixels)
            (features * torch.linspace(-1, 1, features.numel()).view_as(features)).sum().backward()
            runs[name] = (features.detach(), {n: p.grad.clone() for n, p in vit.named_parameters()})
        (fb, gb), (fp, gp) = runs["batched"], runs["packed"]
        return {
            "shape_equal": fb.shape == fp.shape,
            "features": float((fb - fp).abs().max()),
            "grads": max(float((gb[n] - gp[n]).abs().max() / (gb[n].abs().max() + 1e-12)) for n in gb),
        }
    finally:
        destroy_distributed()


def blank_vision_term_in_fp16() -> float:
    """The text-only micro-batch's zero through the ViT and projector, in fp16, with projector outputs whose sum
    is far beyond fp16's range (65504): still exactly zero, never inf * 0 = NaN."""
    init_distributed(ParallelConfig(), seed=5)
    cfg = get_preset("tiny")
    cfg.image_context_token_id = IMG_CONTEXT
    try:
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(dtype="fp16")).eval()
        with torch.no_grad():
            model.projector.mlp.encoder.linear_fc2.bias.fill_(1000.0)
            assert float(model.encode_images(torch.zeros(1, 3, 112, 112, dtype=torch.float16)).float().sum()) > 65504
            return float(model._blank_vision_term())
    finally:
        destroy_distributed()
