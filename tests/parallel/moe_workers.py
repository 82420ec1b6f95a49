"""Rank functions for the mixture-of-experts tests (module level so spawned ranks can import them)."""

from dataclasses import replace
from typing import Dict, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state

from sail_megatron.config import ParallelConfig, PrecisionConfig
from sail_megatron.data.synthetic import IMG_CONTEXT
from sail_megatron.model.build import build_model
from sail_megatron.model.presets import get_preset
from sail_megatron.platform import destroy_distributed, init_distributed
from sail_megatron.training.checkpoint import load_checkpoint, save_checkpoint
from sail_megatron.training.moe_metrics import moe_routing
from sail_megatron.training.optimizer import OptimConfig, setup_training
from sail_megatron.training.step import train_step
from tests.helpers.schedules import steps_schedule
from tests.parallel.workers import MBS, SEQ, _data, _fixed_batch, _run_schedule

PRESET = "tiny-sail-vl2-moe"


def _setup(ep: int = 1, seed: int = 1234, pp: int = 1, **language):
    parallel = ParallelConfig(expert_model_parallel_size=ep, pipeline_model_parallel_size=pp)
    init_distributed(parallel, seed=seed)
    cfg = get_preset(PRESET)
    cfg.image_context_token_id = IMG_CONTEXT
    cfg.language = replace(cfg.language, **language)
    return cfg, parallel, build_model(cfg, parallel, PrecisionConfig(dtype="fp32"))


def _weights(model) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def save_initial_weights(directory: str) -> None:
    """World 1: the seeded initial weights, as a (reshardable) checkpoint every layout loads."""
    _, _, model = _setup()
    try:
        dist_checkpointing.save(model.sharded_state_dict(), directory)
    finally:
        destroy_distributed()


def train_ep(
    ep: int,
    weights_dir: str,
    steps: int,
    save_dir: str,
    save_at: Optional[int] = None,
    resume_from: Optional[str] = None,
    pp: int = 1,
) -> Dict:
    """Train the tiny MoE model under EP (DDP over the world, the distributed optimizer): from the saved
    initial weights, or resumed from a trainer checkpoint (weights, optimizer, schedule); a checkpoint at
    `save_at`. Returns the losses, the routing figures of every step, this rank's weights at `save_at` and
    at the end."""
    cfg, parallel, model = _setup(ep, pp=pp)
    try:
        if resume_from is None:
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), weights_dir))
        optim = OptimConfig(lr=1e-3, warmup_steps=0, decay_steps=100)
        chunks, optimizer, scheduler = setup_training(
            model, optim, parallel, PrecisionConfig(dtype="fp32"), steps_schedule(optim)
        )
        start = load_checkpoint(resume_from, chunks, optimizer, scheduler)["iteration"] if resume_from else 0
        data = _data(cfg).micro_batches(
            parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(), 1, start_step=start
        )
        routing = moe_routing(chunks, parallel)
        losses, figures, saved = [], [], None
        for step in range(start, steps):
            losses.append(train_step(chunks, optimizer, scheduler, data, 1, SEQ, MBS).loss)
            figures.append(routing.collect())
            if save_at == step + 1:
                save_checkpoint(save_dir, step + 1, chunks, optimizer, scheduler, keep_last=5)
                saved = _weights(model)
        return {
            "losses": losses,
            "routing": figures,
            "saved": saved,
            "final": _weights(model),
            "ep_rank": parallel_state.get_expert_model_parallel_rank(),
        }
    finally:
        destroy_distributed()


def read_checkpoint_weights(directory: str) -> Dict[str, torch.Tensor]:
    """World 1 (EP 1): the model weights of a trainer checkpoint written under any layout."""
    from sail_megatron.training.checkpoint_files import resolve_checkpoint_folder

    _, _, model = _setup()
    try:
        state = dist_checkpointing.load(
            {"model": model.sharded_state_dict()}, str(resolve_checkpoint_folder(directory))
        )
        model.load_state_dict(state["model"])
        return _weights(model)
    finally:
        destroy_distributed()


def aux_loss_gradient(coeff: float) -> Dict[str, torch.Tensor]:
    """World 1: one forward/backward of a fixed batch through megatron's schedule with the per-token loss,
    with the load-balancing loss at `coeff` and at 0; the last layer's router gradient both ways and the
    router's input, to recompute the loss independently."""
    cfg, _, model = _setup(moe_aux_loss_coeff=coeff)
    try:
        router = model.language_model.decoder.layers[-1].mlp.router
        captured = {}
        router.register_forward_pre_hook(lambda m, args: captured.__setitem__("input", args[0].detach().clone()))
        batch = _fixed_batch(cfg)
        grads = {}
        for name, c in (("with", coeff), ("without", 0.0)):
            model.zero_grad()
            model.config.moe_aux_loss_coeff = c  # one config object: the router reads it per forward
            _run_schedule(model, batch, forward_only=False, with_labels=True)
            grads[name] = router.weight.grad.detach().clone()
        return {**grads, "input": captured["input"], "weight": router.weight.detach().clone(), "tokens": batch.tokens}
    finally:
        destroy_distributed()


def packed_vs_alone_ep(ep: int, weights_dir: str) -> Optional[Dict]:
    """Per-sample logits and losses, packed and alone, under EP (tests/parallel/workers.py's case)."""
    from tests.parallel.workers import packing_outputs

    cfg, _, model = _setup(ep)
    try:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), weights_dir))
        model.eval()
        out = packing_outputs(model, cfg)
        return out if parallel_state.get_data_parallel_rank() == 0 else None
    finally:
        destroy_distributed()


def global_expert_names(local: Dict[str, torch.Tensor], ep_rank: int, experts_per_rank: int) -> Dict[str, torch.Tensor]:
    """An EP rank's parameters under the EP-1 model's names (its local expert i is global ep_rank * n + i)."""
    out = {}
    for name, t in local.items():
        head, sep, tail = name.partition(".local_experts.")
        if sep:
            index, rest = tail.split(".", 1)
            name = f"{head}.local_experts.{ep_rank * experts_per_rank + int(index)}.{rest}"
        out[name] = t
    return out
