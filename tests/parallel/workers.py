"""Rank functions for the parallel-layout tests (module level so spawned ranks can import them)."""

from typing import Dict, List, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from sail_megatron.config import FreezeConfig, ParallelConfig, PrecisionConfig
from sail_megatron.data.batch import Batch
from sail_megatron.data.synthetic import IMG_CONTEXT, SyntheticConfig, SyntheticImageCaptions
from sail_megatron.model.build import build_model
from sail_megatron.model.presets import get_preset
from sail_megatron.platform import destroy_distributed, init_distributed
from sail_megatron.training.freezing import apply_freezing
from sail_megatron.training.optimizer import OptimConfig, setup_training
from sail_megatron.training.step import masked_token_loss, packed_seq_params, train_step
from tests.helpers.schedules import steps_schedule

SEQ, MBS = 96, 2


def _setup(tp: int = 1, pp: int = 1, seed: int = 1234, sp: bool = False, preset: str = "tiny"):
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp)
    init_distributed(parallel, seed=seed)
    cfg = get_preset(preset)
    cfg.image_context_token_id = IMG_CONTEXT
    model = build_model(cfg, parallel, PrecisionConfig(dtype="fp32"))
    return cfg, parallel, model


def _data(cfg, micro_batch_size: int = MBS) -> SyntheticImageCaptions:
    return SyntheticImageCaptions(
        SyntheticConfig(
            seq_length=SEQ,
            micro_batch_size=micro_batch_size,
            image_size=cfg.vision.image_size,
            tokens_per_tile=cfg.tokens_per_tile,
            vocab_size=cfg.language.vocab_size,
            seed=7,
        )
    )


def _fixed_batch(cfg):
    return next(_data(cfg).micro_batches(0, 1, 1))


def _run_schedule(model, batch, forward_only: bool, with_labels: bool) -> Optional[torch.Tensor]:
    """One micro-batch through the pipeline schedule; returns the last stage's output (full vocab)."""
    captured = {}

    def step(data_iterator, m):
        b = next(data_iterator)
        out = m(
            b.tokens,
            b.position_ids,
            None,
            pixel_values=b.pixel_values,
            labels=b.labels if with_labels else None,
            packed_seq_params=packed_seq_params(b),
        )

        def loss_fn(output):
            if with_labels:
                captured["out"] = output.detach().clone()
                return masked_token_loss(b.loss_mask, output)
            captured["out"] = tensor_parallel.gather_from_tensor_model_parallel_region(output.detach()).clone()
            return output.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

        return out, loss_fn

    get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=batch.tokens.shape[1],
        micro_batch_size=batch.tokens.shape[0],
        forward_only=forward_only,
    )
    return captured.get("out")


def _load(model, directory: str) -> None:
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))


def _sum_tied_embedding_grads(model) -> None:
    """Tied embeddings under PP: the first stage's input embedding and the last stage's output layer are
    one weight held twice; its gradient is their sum (megatron's finalize_model_grads does this in training)."""
    if not model.share_embeddings_and_output_weights or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        weight = model.language_model.shared_embedding_or_output_weight()
        torch.distributed.all_reduce(weight.grad, group=parallel_state.get_embedding_group())


def _sum_qk_norm_grads(model) -> None:
    """q/k norms are replicated over TP but each rank normalizes only its heads: their gradient is the sum
    over TP ranks (again as finalize_model_grads does in training)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    for name, p in model.named_parameters():
        if "q_layernorm" in name or "k_layernorm" in name:
            torch.distributed.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())


def _grads_into_params(model) -> None:
    _sum_tied_embedding_grads(model)
    _sum_qk_norm_grads(model)
    for p in model.parameters():
        p.data.copy_(p.grad if p.grad is not None else torch.zeros_like(p))


def reference_run(weights_dir: str, preset: str = "tiny") -> Dict:
    """World 1: save the initial weights, then return losses, logits and gradients by name."""
    cfg, _, model = _setup(preset=preset)
    try:
        dist_checkpointing.save(model.sharded_state_dict(), weights_dir)
        batch = _fixed_batch(cfg)
        logits = _run_schedule(model, batch, forward_only=True, with_labels=False)
        losses = _run_schedule(model, batch, forward_only=False, with_labels=True)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        return {"logits": logits, "losses": losses, "grads": grads}
    finally:
        destroy_distributed()


def layout_run(tp: int, pp: int, weights_dir: str, grads_dir: str, sp: bool = False, preset: str = "tiny") -> Dict:
    """Same weights and batch under TP x PP (x SP); gradients are written as a (reshardable) checkpoint."""
    cfg, _, model = _setup(tp, pp, sp=sp, preset=preset)
    try:
        _load(model, weights_dir)
        batch = _fixed_batch(cfg)
        logits = _run_schedule(model, batch, forward_only=True, with_labels=False)
        losses = _run_schedule(model, batch, forward_only=False, with_labels=True)
        _grads_into_params(model)
        dist_checkpointing.save(model.sharded_state_dict(), grads_dir)
        report = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        return {"logits": logits, "losses": losses} if report else None
    finally:
        destroy_distributed()


def read_full_checkpoint(directory: str, preset: str = "tiny") -> Dict[str, torch.Tensor]:
    """World 1: a checkpoint saved under any layout, as full tensors by parameter name."""
    _, _, model = _setup(preset=preset)
    try:
        _load(model, directory)
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        destroy_distributed()


def train_steps(
    steps: int,
    num_microbatches: int,
    trainable: Optional[List[str]] = None,
    tp: int = 1,
    pp: int = 1,
    preset: str = "tiny",
) -> Dict:
    """Train the tiny model with DDP and the distributed optimizer; return initial and final weights
    (this rank's stage) and how many parameters the optimizer holds state for."""
    cfg, parallel, model = _setup(tp, pp, preset=preset)
    try:
        apply_freezing(model, FreezeConfig(trainable=trainable or ["vision", "projector", "language"]))
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        optim = OptimConfig(lr=1e-3, warmup_steps=0, decay_steps=100)
        chunks, optimizer, scheduler = setup_training(
            model, optim, parallel, PrecisionConfig(dtype="fp32"), steps_schedule(optim)
        )
        data = _data(cfg).micro_batches(
            parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(), num_microbatches
        )
        losses = [train_step(chunks, optimizer, scheduler, data, num_microbatches, SEQ, MBS).loss for _ in range(steps)]
        final = {n: p.detach().clone() for n, p in model.named_parameters()}
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        return {"initial": initial, "final": final, "losses": losses, "trained": trained}
    finally:
        destroy_distributed()


def packing_outputs(model, cfg) -> Dict:
    """Logits and losses of the packed row and of its samples run alone (the packing invariant's inputs)."""
    packed, alone, cu = _packing_case(cfg)
    return {
        "cu": cu,
        "packed_logits": _run_schedule(model, packed, True, False),
        "packed_losses": _run_schedule(model, packed, True, True),
        "alone_logits": [_run_schedule(model, b, True, False) for b in alone],
        "alone_losses": [_run_schedule(model, b, True, True) for b in alone],
    }


def _packing_case(cfg):
    """Three samples (one or two images each) as one packed row and as rows of their own, padded to the
    packed length (causal attention: padding after a sample cannot change it)."""
    src = _data(cfg, micro_batch_size=1)
    samples = [src.sample(i) for i in (3, 4, 5)]
    lengths = [min(int((s.tokens != 0).sum()) + 1, SEQ) for s in samples]
    total = sum(lengths)
    packed = Batch.pack(samples, lengths)

    def alone(s, n):
        def pad(t):
            return torch.nn.functional.pad(t[:, :n], (0, total - n))

        return Batch(
            tokens=pad(s.tokens),
            labels=pad(s.labels),
            loss_mask=pad(s.loss_mask),
            position_ids=torch.arange(total)[None],
            pixel_values=s.pixel_values,
        )

    return packed, [alone(s, n) for s, n in zip(samples, lengths)], packed.cu_seqlens


def packed_vs_alone(tp: int, pp: int, weights_dir: Optional[str], preset: str = "tiny") -> Optional[Dict]:
    """Per-sample logits and losses, packed and alone, under TP x PP (same weights for every layout;
    without `weights_dir`, the seeded initial weights of a single process)."""
    cfg, _, model = _setup(tp, pp, preset=preset)
    try:
        if weights_dir is not None:
            _load(model, weights_dir)
        model.eval()
        out = packing_outputs(model, cfg)
        last = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        return out if last else None
    finally:
        destroy_distributed()


def sequence_parallel_build_error() -> str:
    """The ConfigError message for SP on megatron-core's local (torch) norms."""
    from sail_megatron.config import ConfigError

    try:
        _setup(2, 1, sp=True)
        return "built"
    except ConfigError as e:
        return str(e)
    finally:
        destroy_distributed()


def train_with_checkpoint(
    total_steps: int, save_at: Optional[int], resume_from: Optional[str], save_dir: str, tp: int = 1, pp: int = 1
) -> Dict:
    """Train the tiny model; optionally save at step `save_at`, or resume from `resume_from` first.
    Returns the losses of the steps this call ran and the final weights of rank 0's stage."""
    from sail_megatron.training.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint

    cfg, parallel, model = _setup(tp, pp)
    try:
        optim = OptimConfig(lr=1e-3, warmup_steps=1, decay_steps=10)
        chunks, optimizer, scheduler = setup_training(
            model, optim, parallel, PrecisionConfig(dtype="fp32"), steps_schedule(optim)
        )
        start = 0
        if resume_from is not None:
            loaded = load_checkpoint(resume_from, chunks, optimizer, scheduler)
            start = loaded["iteration"]
            restore_rng_state(loaded["rank_state"]["rng"])
        data = _data(cfg).micro_batches(
            parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(), 1, start_step=start
        )
        losses = []
        for step in range(start, total_steps):
            losses.append(train_step(chunks, optimizer, scheduler, data, 1, SEQ, MBS).loss)
            if save_at is not None and step + 1 == save_at:
                save_checkpoint(save_dir, step + 1, chunks, optimizer, scheduler, keep_last=2)
        return {
            "losses": losses,
            "final": {n: p.detach().clone() for n, p in model.named_parameters()},
            "lr": scheduler.get_lr(optimizer.param_groups[0]),
        }
    finally:
        destroy_distributed()


def read_training_checkpoint_model(directory: str) -> Dict[str, torch.Tensor]:
    """World 1: the model weights of a training checkpoint (any layout), as full tensors."""
    _, _, model = _setup()
    try:
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, directory)
        model.load_state_dict(state["model"])
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        destroy_distributed()
