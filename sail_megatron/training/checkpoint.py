"""Checkpoints with megatron-core dist_checkpointing: model, optimizer, scheduler and iteration,
reshardable across TP/PP/DP; each data-parallel rank's loader state (continued at another DP size by
training/data_position.py); per-rank RNG state for exact resume at the same layout.

A checkpoint is written to `iter_XXXXXXXX.tmp`, renamed when every rank has finished, and only then
does the `latest` pointer move (itself replaced atomically). A run killed mid-write leaves the previous
checkpoint and pointer intact. Older checkpoints beyond `keep_last` are deleted after the pointer moves.

`CheckpointWriter` writes either synchronously or in the background (`run.async_save`): megatron-core's
async dist_checkpointing stages the state in host memory and a forked writer process writes it while
training goes on; the rename, the pointer and the pruning above run as its finalization, on every rank
once every rank's writer is done. One write is in flight at a time.
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
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from sail_megatron.platform.megatron_compat import (
    checkpoint_results_queue_dies_with_rank,
    torch_adam_checkpoint_fix,
    unshare_adam_steps,
)
from sail_megatron.training.backend_state import apply_model_state, load_sharded
from sail_megatron.training.checkpoint_files import CheckpointError, resolve_checkpoint_folder
from sail_megatron.training.run_dir import KEEP_FILE, LATEST, checkpoint_name, checkpoint_step, checkpoints_to_prune

logger = logging.getLogger(__name__)

# How the distributed optimizer's state is laid out in a checkpoint (megatron-core's sharding types, the
# choices in config.train.OPTIMIZER_CHECKPOINTS): 'dp_reshardable' writes each rank's flat buffers in
# parallel, with no gather (the fast choice for frequent saves; loads under another DP size, not another
# TP/PP); 'fully_reshardable' gathers the state on each DP group's first rank into a per-parameter layout
# that loads under any TP/PP/DP. The trainer passes run.optimizer_checkpoint; other callers get this.
DEFAULT_OPTIMIZER_FORMAT = "fully_reshardable"


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def _rank_state_object(state: Dict[str, Any]) -> ShardedObject:
    world, rank = dist.get_world_size(), dist.get_rank()
    return ShardedObject("rank_state", state, (world,), (rank,), replica_id=0)


def _replica_peer() -> int:
    """0 on the first of a data-parallel rank's TP/PP peers (which read the same data), else not 0."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() + ps.get_pipeline_model_parallel_rank()


def _data_state_object(state: Any) -> ShardedObject:
    """This data-parallel rank's loader state, written once: its TP and PP peers read the same data."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return ShardedObject("data_state", state, (dp,), (rank,), replica_id=_replica_peer())


def load_data_states(path, saved_data_parallel: int, ranks: Dict[int, bool]) -> Dict[int, Any]:
    """Collective: the loader states the checkpoint holds for the saved data-parallel ranks in `ranks`.
    Every saved rank must be read by some rank, and counted once: `ranks[d]` is True on the one
    data-parallel rank that counts it (dist_checkpointing checks the reads cover each object once)."""
    directory = resolve_checkpoint_folder(path)
    peer = _replica_peer()
    sd = {
        f"data_state_{d}": ShardedObject("data_state", None, (saved_data_parallel,), (d,), int(peer or not first))
        for d, first in ranks.items()
    }
    loaded = dist_checkpointing.load(sd, str(directory))
    return {d: loaded[f"data_state_{d}"] for d in ranks}


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


def _sharded_state(chunks, optimizer, is_loading: bool, optimizer_format: str) -> Dict[str, Any]:
    model_sd = _unwrap(chunks[0]).sharded_state_dict()
    sd = {"model": model_sd}
    if optimizer is not None:
        # Loading needs state to fill; saving before any update (every step so far skipped) needs
        # state to write. Zero moments at step 0 are exactly what a fresh Adam starts from.
        _materialize_adam_state(optimizer)
        metadata = {"distrib_optim_sharding_type": optimizer_format}
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    return sd


def _layout(chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    """The parallel layout a checkpoint is written under (recorded with it)."""
    from megatron.core import parallel_state

    vision = getattr(_unwrap(chunks[0]), "vision_layout", None)
    return {
        "world_size": dist.get_world_size(),
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel": parallel_state.get_data_parallel_world_size(),
        "vision_parallel": vision.name if vision is not None else "tensor",
        "expert_parallel": parallel_state.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel": parallel_state.get_expert_tensor_parallel_world_size(),
    }


def _commit(save_dir: Path, tmp: Path, final: Path, keep_last: int, keep: Optional[str] = None) -> None:
    """Collective, after every rank's write is complete: the folder is renamed into place, then the
    pointer moves, then older checkpoints beyond keep_last go. `keep`: why this checkpoint is kept for good
    (written into it before the rename, so pruning never sees it without the mark)."""
    dist.barrier()
    if dist.get_rank() == 0:
        if keep:
            (tmp / KEEP_FILE).write_text(keep + "\n")
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


@torch_adam_checkpoint_fix()
def save_checkpoint(
    save_dir,
    iteration: int,
    chunks: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    common: Optional[Dict[str, Any]] = None,
    rank_state: Optional[Dict[str, Any]] = None,
    data_state: Any = None,
    keep_last: int = 3,
    async_queue: Optional[AsyncCallsQueue] = None,
    optimizer_format: str = DEFAULT_OPTIMIZER_FORMAT,
    keep: Optional[str] = None,
) -> Path:
    """Collective: every rank calls it. `common` is small run state (same on all ranks, e.g. consumed
    samples); `rank_state` is per rank (beside its RNG state), `data_state` per data-parallel rank (the
    loader's state; None: not saved). With `async_queue` the write is scheduled there
    and this returns once the state is staged; the checkpoint appears when the queue finalizes it. `keep`:
    the reason this checkpoint is never pruned (a scaling-curve point)."""
    save_dir = Path(save_dir)
    final, tmp = save_dir / checkpoint_name(iteration), save_dir / (checkpoint_name(iteration) + ".tmp")
    if dist.get_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    checkpoint_results_queue_dies_with_rank()
    _gather_current_weights(chunks)
    sd = _sharded_state(chunks, optimizer, is_loading=False, optimizer_format=optimizer_format)
    sd["iteration"] = iteration
    sd["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    sd["common"] = common or {}
    sd["rank_state"] = _rank_state_object({"rng": rng_state(), **(rank_state or {})})
    if data_state is not None:
        sd["data_state"] = _data_state_object(data_state)
    metadata = _layout(chunks)
    if async_queue is None:
        dist_checkpointing.save(sd, str(tmp), content_metadata=metadata)
        _commit(save_dir, tmp, final, keep_last, keep)
        return final
    request = dist_checkpointing.save(sd, str(tmp), content_metadata=metadata, async_sharded_save=True)
    request.add_finalize_fn(lambda: _commit(save_dir, tmp, final, keep_last, keep))
    async_queue.schedule_async_request(request)
    return final


class CheckpointWriter:
    """The run's checkpoint saves, synchronous or in the background (`run.async_save`). Every method is
    collective: every rank calls it at the same point (`poll` once per step)."""

    def __init__(self, save_dir, keep_last: int, async_save: bool, optimizer_format: str = DEFAULT_OPTIMIZER_FORMAT):
        self.save_dir, self.keep_last, self.optimizer_format = Path(save_dir), keep_last, optimizer_format
        self.queue = AsyncCallsQueue() if async_save else None
        self.in_flight: Optional[Path] = None

    def save(
        self,
        iteration: int,
        chunks,
        optimizer=None,
        scheduler=None,
        common=None,
        rank_state=None,
        data_state=None,
        keep: Optional[str] = None,
    ) -> Path:
        """Start (async) or write (sync) the checkpoint of `iteration`; a previous background write is
        completed first, so at most one is in flight."""
        self.wait()
        began = time.perf_counter()
        final = save_checkpoint(
            self.save_dir,
            iteration,
            chunks,
            optimizer,
            scheduler,
            common=common,
            rank_state=rank_state,
            data_state=data_state,
            keep_last=self.keep_last,
            async_queue=self.queue,
            optimizer_format=self.optimizer_format,
            keep=keep,
        )
        self.in_flight = final if self.queue is not None else None
        logger.info(
            "checkpoint %s: the step loop waited %.2f s (%s)",
            final.name,
            time.perf_counter() - began,
            "state staged, written in the background" if self.queue is not None else "written",
        )
        return final

    def step_of_failure(self, step: int) -> int:
        """The step whose checkpoint a failure just raised belongs to: a background write still in flight
        (it fails where it is finished: at a later step, or at the next save), else `step`."""
        return checkpoint_step(self.in_flight.name) if self.in_flight is not None else step

    def poll(self) -> None:
        """Finalize a background write that every rank has finished (one small all-reduce)."""
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            if self.queue.maybe_finalize_async_calls(blocking=False):
                self.in_flight = None

    def wait(self) -> None:
        """Block until a background write is written and committed (before exiting, or the next save)."""
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            began = time.perf_counter()
            self.queue.maybe_finalize_async_calls(blocking=True)
            logger.info(
                "background checkpoint write of %s completed (waited %.1f s)",
                self.in_flight,
                time.perf_counter() - began,
            )
            self.in_flight = None

    def close(self) -> None:
        self.wait()
        if self.queue is not None:
            self.queue.close()


@torch_adam_checkpoint_fix()
def load_checkpoint(path, chunks: List[torch.nn.Module], optimizer=None, scheduler=None) -> Dict[str, Any]:
    """Load into this layout (any TP/PP/DP for model and optimizer). Returns iteration, common state,
    this rank's saved state (None when the checkpoint was written by a different world size) and the
    layout it was written under (world_size, tensor/pipeline/data_parallel)."""
    directory = resolve_checkpoint_folder(path)
    common = dist_checkpointing.load_common_state_dict(str(directory))
    saved = common.get("content_metadata", {})
    optimizer_format = (common.get("optimizer") or {}).get("param_state_sharding_type", DEFAULT_OPTIMIZER_FORMAT)
    if optimizer is not None and optimizer_format == "dp_reshardable":
        _check_dp_reshardable(directory, saved, _layout(chunks))
    sd = _sharded_state(chunks, optimizer, is_loading=True, optimizer_format=optimizer_format)
    same_world = saved.get("world_size") == dist.get_world_size()
    if same_world:
        sd["rank_state"] = _rank_state_object({})
    state = load_sharded(sd, directory)
    apply_model_state(_unwrap(chunks[0]), state["model"], directory)
    if optimizer is not None:
        # No autograd: with fp32 weights the optimizer's main params are views of the model's leaf params,
        # which megatron copies into in place (its dp_reshardable load does so outside no_grad).
        with torch.no_grad():
            optimizer.load_state_dict(state["optimizer"])
        unshare_adam_steps(optimizer)
    if scheduler is not None and common.get("scheduler") is not None:
        scheduler.load_state_dict(common["scheduler"])
    rank = state.get("rank_state") if same_world else None
    if rank is None:
        logger.info("checkpoint %s was written by another world size: per-rank RNG state starts fresh", directory)
    return {
        "iteration": common["iteration"],
        "common": common.get("common", {}),
        "rank_state": rank,
        "scheduler": common.get("scheduler"),
        "layout": saved,
        "path": directory,
    }


def _check_dp_reshardable(directory: Path, saved: Dict[str, int], now: Dict[str, int]) -> None:
    """Optimizer state saved as each rank's flat buffers loads under another DP size only."""
    # Checkpoints from before the vision layouts and expert parallelism.
    saved = {"vision_parallel": "tensor", "expert_parallel": 1, **saved}
    saved.setdefault("expert_tensor_parallel", saved.get("tensor_parallel"))
    kinds = ("tensor_parallel", "pipeline_parallel", "vision_parallel", "expert_parallel", "expert_tensor_parallel")
    changed = [k for k in kinds if k in saved and saved[k] != now[k]]
    if changed:
        raise CheckpointError(
            directory,
            [", ".join(f"{k} {saved[k]} there vs {now[k]} here" for k in changed)],
            "its optimizer state was saved as 'dp_reshardable', which loads under another data-parallel size "
            "but not another TP/PP/EP or parallel.vision_parallel: resume with the saved layout, save with "
            "run.optimizer_checkpoint=fully_reshardable to change it, or start from its weights alone "
            "(run.init_from)",
        )


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
