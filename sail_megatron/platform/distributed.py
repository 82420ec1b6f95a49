"""Process-group and megatron-core parallel-state set-up from the torchrun environment."""

import datetime
import logging
import os
import warnings
from dataclasses import dataclass

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


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 10) -> DistEnv:
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
    if not dist.is_initialized():
        dist.init_process_group(
            backend=env.backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=env.device if env.backend == "nccl" else None,
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
