"""Process-group and megatron-core parallel-state set-up from the torchrun environment."""

import datetime
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from sail_megatron.config import ParallelConfig
from sail_megatron.platform.backends import detect_backends
from sail_megatron.platform.cpu_emulation import enter_cpu_emulation, exit_cpu_emulation
from sail_megatron.platform.megatron_compat import define_missing_te_names

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits; read from the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_dist_env() -> DistEnv:
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if detect_backends().cuda:
        return DistEnv(rank, world_size, local_rank, torch.device("cuda", local_rank), "nccl")
    return DistEnv(rank, world_size, local_rank, torch.device("cpu"), "gloo")


def _quiet_megatron_deprecations() -> None:
    """megatron-core 0.16 calls torch.distributed functions that torch 2.13 deprecates; every rank would
    print that on each bucket's first collective, and nothing a user does can change it."""
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings(
            "ignore", message=rf"`torch\.distributed\.{name}` is deprecated", category=FutureWarning
        )


def _launch_attempt() -> int:
    """Which attempt of the job this is under torchrun (0: the first), as its agent counts them."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _shares_agent_store() -> bool:
    """torchrun keeps one rendezvous store for the whole job (its default; the static rendezvous always),
    unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every launch attempt a fresh one on a fresh port."""
    return "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def restart_rendezvous_problem() -> Optional[str]:
    """Why restarts of this launch could rendezvous under different keys on different ranks, or None.

    In a shared store every attempt writes the process group's keys anew, so each attempt needs its own
    key prefix, and the only attempt number ranks share without talking to each other is their agent's
    restart count, which agrees between the ranks of one node but not between nodes (a node that failed
    counts a restart, the others re-rendezvous without one). A count kept in the store itself desynchronizes
    for good when a rank dies before adding to it. So several nodes with restarts need a fresh store per
    attempt."""
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if not _shares_agent_store() or nodes == 1 or restarts == 0:
        return None
    return (
        f"torchrun restarts this {nodes}-node job ({restarts} restarts) over one shared rendezvous store, where "
        "restarted ranks of different nodes can wait under different keys until the process-group timeout. "
        "Fix: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun with --rdzv-backend c10d (the launch "
        "scripts in examples/launch do), or pass --max-restarts 0"
    )


def _attempt_store(env: DistEnv, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """The rendezvous store of this launch attempt, or None for torch's own env:// rendezvous.

    With a fresh store per attempt (outside torchrun, or TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) torch's
    env:// rendezvous is right. In torchrun's shared store, torch 2.13 puts every attempt's process-group
    keys under the same names, so a restarted rank could read a dead rank's address left by the previous
    attempt: each attempt gets its own prefix, from the agent's restart count (one node; several nodes with
    restarts are refused, restart_rendezvous_problem)."""
    if not _shares_agent_store():
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env.world_size,
        is_master=False,
        timeout=timeout,
        wait_for_workers=False,
    )
    return dist.PrefixStore(f"sail-megatron/attempt-{_launch_attempt()}", store)


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: float = 10) -> DistEnv:
    """Initialise torch.distributed and megatron-core's model-parallel groups and RNG.

    CUDA + NCCL when a GPU is present; otherwise CPU + gloo with megatron-core's CUDA-only calls
    redirected (see cpu_emulation). Single-process runs need no torchrun: MASTER_ADDR/PORT default
    to loopback.
    """
    env = read_dist_env()
    _quiet_megatron_deprecations()
    define_missing_te_names()
    if _launch_attempt() > 0 and env.is_main:
        logger.warning(
            "launch attempt %d of at most %s (torchrun restarted the job after a failure)",
            _launch_attempt() + 1,
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) + 1,
        )
    if env.backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    else:
        enter_cpu_emulation()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=env.backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            device_id=env.device if env.backend == "nccl" else None,
            store=_attempt_store(env, timeout),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        # Mixture-of-experts layers: experts split over EP ranks (taken from TP x DP), each expert over ETP;
        # megatron-core builds the expert data-parallel groups its DDP and distributed optimizer use.
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return env


def destroy_distributed() -> None:
    """Tear down the process groups and, on the CPU, end the CPU layer (every patched function comes back)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    exit_cpu_emulation()
