"""Device, distributed set-up and the CPU emulation of megatron-core's CUDA-only calls."""

from sail_megatron.platform.backends import Backends, detect_backends, log_backends_once
from sail_megatron.platform.cpu_emulation import cpu_emulation, cpu_emulation_installed
from sail_megatron.platform.distributed import DistEnv, destroy_distributed, init_distributed, read_dist_env

__all__ = [
    "Backends",
    "detect_backends",
    "log_backends_once",
    "cpu_emulation_installed",
    "cpu_emulation",
    "DistEnv",
    "destroy_distributed",
    "init_distributed",
    "read_dist_env",
]
