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


def _attempt_store(env: DistEnv, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """The rendezvous store of this launch attempt, under torchrun (which may restart the job).

    torchrun can keep one store for the whole job, and every process group stores its members' addresses
    in it under the same keys in each attempt: after a restart a new rank could read a dead rank's address
    left by the previous attempt and fail, or wait, to connect to it. So each attempt uses its own key
    prefix. The attempt is counted in the store itself (every rank of an attempt adds one on arrival)
    rather than taken from TORCHELASTIC_RESTART_COUNT, which differs between nodes after one node's
    failure. Outside torchrun: None (torch's own env:// rendezvous)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env.world_size,
        is_master=env.rank == 0 and not agent_hosts_store,
        timeout=timeout,
        wait_for_workers=False,
    )
    attempt = (store.add("sail-megatron/arrivals", 1) - 1) // env.world_size
    if attempt > 0 and env.is_main:
        logger.warning("launch attempt %d in this store (the job was restarted after a failure)", attempt + 1)
    return dist.PrefixStore(f"sail-megatron/attempt-{attempt}", store)


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: float = 10) -> DistEnv:
    """Initialise torch.distributed and megatron-core's model-parallel groups and RNG.

    CUDA + NCCL when a GPU is present; otherwise CPU + gloo with megatron-core's CUDA-only calls
    redirected (see cpu_emulation). Single-process runs need no torchrun: MASTER_ADDR/PORT default
    to loopback.
    """
    env = read_dist_env()
    _quiet_megatron_deprecations()
    # One hardware queue keeps TP communication ordered ahead of compute (megatron-core's advice);
    # it must be set before the CUDA context exists.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
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
