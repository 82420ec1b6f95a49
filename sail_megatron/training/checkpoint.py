"""Checkpoints with megatron-core dist_checkpointing: model, optimizer, scheduler and iteration,
reshardable across TP/PP/DP; per-rank RNG and loader state for exact resume at the same layout.

A checkpoint is written to `iter_XXXXXXXX.tmp`, renamed when every rank has finished, and only then
does the `latest` pointer move (itself replaced atomically). A run killed mid-write leaves the previous
checkpoint and pointer intact. Older checkpoints beyond `keep_last` are deleted after the pointer moves.
"""

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from sail_megatron.platform.megatron_compat import torch_adam_checkpoint_fix, unshare_adam_steps
from sail_megatron.training.checkpoint_files import resolve_checkpoint_folder
from sail_megatron.training.run_dir import LATEST, checkpoint_name, checkpoints_to_prune

logger = logging.getLogger(__name__)

# Optimizer state in a canonical per-parameter layout, so a checkpoint loads under any TP/PP/DP.
_OPTIM_META = {"distrib_optim_sharding_type": "fully_reshardable"}


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def _rank_state_object(state: Dict[str, Any]) -> ShardedObject:
    world, rank = dist.get_world_size(), dist.get_rank()
    return ShardedObject("rank_state", state, (world,), (rank,), replica_id=0)


def _materialize_adam_state(optimizer) -> None:
    """A fresh torch Adam has no state, and megatron-core's distributed optimizer cannot describe (for
    a load) or gather (for a save) state without one: give it empty Adam state.
    (TE's and apex's fused Adam keep `step` in the param groups and need nothing.)"""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(
                        step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)
                    )


def _gather_current_weights(chunks: List[torch.nn.Module]) -> None:
    """With the distributed optimizer and `overlap_param_gather`, a step updates only each rank's own
    shard of the model weights; the rest arrive in the next forward's all-gather. Gather them now, so
    a checkpoint never holds weights one step old."""
    for chunk in chunks:
        ddp = getattr(chunk, "ddp_config", None)
        if ddp is not None and ddp.use_distributed_optimizer and ddp.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def _sharded_state(chunks, optimizer, is_loading: bool) -> Dict[str, Any]:
    model_sd = _unwrap(chunks[0]).sharded_state_dict()
    sd = {"model": model_sd}
    if optimizer is not None:
        # Loading needs state to fill; saving before any update (every step so far skipped) needs
        # state to write. Zero moments at step 0 are exactly what a fresh Adam starts from.
        _materialize_adam_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPTIM_META)
    return sd


@torch_adam_checkpoint_fix()
def save_checkpoint(
    save_dir,
    iteration: int,
    chunks: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    common: Optional[Dict[str, Any]] = None,
    rank_state: Optional[Dict[str, Any]] = None,
    keep_last: int = 3,
) -> Path:
    """Collective: every rank calls it. `common` is small run state (same on all ranks, e.g. consumed
    samples); `rank_state` is per rank (RNG, loader state)."""
    save_dir = Path(save_dir)
    final, tmp = save_dir / checkpoint_name(iteration), save_dir / (checkpoint_name(iteration) + ".tmp")
    if dist.get_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    _gather_current_weights(chunks)
    sd = _sharded_state(chunks, optimizer, is_loading=False)
    sd["iteration"] = iteration
    sd["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    sd["common"] = common or {}
    sd["rank_state"] = _rank_state_object({"rng": rng_state(), **(rank_state or {})})
    dist_checkpointing.save(sd, str(tmp), content_metadata={"world_size": dist.get_world_size()})
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():  # never delete a checkpoint this call did not write: keep it under another name
            aside = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(final, aside)
            logger.warning("%s already existed: kept as %s", final, aside.name)
        os.replace(tmp, final)
        pointer_tmp = save_dir / (LATEST + ".tmp")
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, save_dir / LATEST)
        for old in checkpoints_to_prune(save_dir, final, keep_last):
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return final


@torch_adam_checkpoint_fix()
def load_checkpoint(path, chunks: List[torch.nn.Module], optimizer=None, scheduler=None) -> Dict[str, Any]:
    """Load into this layout (any TP/PP/DP for model and optimizer). Returns iteration, common state
    and this rank's saved state (None when the checkpoint was written by a different world size)."""
    directory = resolve_checkpoint_folder(path)
    common = dist_checkpointing.load_common_state_dict(str(directory))
    sd = _sharded_state(chunks, optimizer, is_loading=True)
    same_world = common.get("content_metadata", {}).get("world_size") == dist.get_world_size()
    if same_world:
        sd["rank_state"] = _rank_state_object({})
    state = dist_checkpointing.load(sd, str(directory))
    _unwrap(chunks[0]).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        unshare_adam_steps(optimizer)
    if scheduler is not None and common.get("scheduler") is not None:
        scheduler.load_state_dict(common["scheduler"])
    rank = state.get("rank_state") if same_world else None
    if rank is None:
        logger.warning("checkpoint %s was written by another world size: RNG and loader state start fresh", directory)
    return {"iteration": common["iteration"], "common": common.get("common", {}), "rank_state": rank, "path": directory}


def rng_state() -> Dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
