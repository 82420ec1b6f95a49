"""Rank functions for the platform tests."""

import torch

from sail_megatron.config import ParallelConfig
from sail_megatron.platform import cpu_emulation_installed, destroy_distributed, init_distributed


def cpu_emulation_behaviour() -> dict:
    env = init_distributed(ParallelConfig(), seed=11)
    try:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        t = torch.zeros(2, device="cuda")
        out = {
            "backend": env.backend,
            "installed": cpu_emulation_installed(),
            "literal_device": t.device.type,
            "dot_cuda_is_identity": t.cuda() is t,
            "to_cuda": torch.ones(1).to("cuda").device.type,
            "current_device": str(torch.cuda.current_device()),
            "type_name": torch.ones(1).type(),
            "int_type_unchanged": torch.ones(1, dtype=torch.int64).type(),
        }
        # The model-parallel RNG stream is separate from the default one and restores it on exit.
        state = torch.get_rng_state()
        expected = torch.rand(4)
        torch.set_rng_state(state)
        with get_cuda_rng_tracker().fork():
            forked = torch.rand(4)
        out["default_stream_untouched"] = torch.equal(torch.rand(4), expected)
        out["forked_differs"] = not torch.equal(forked, expected)
        with get_cuda_rng_tracker().fork():
            out["forked_advances"] = not torch.equal(torch.rand(4), forked)
        return out
    finally:
        destroy_distributed()


def tp_ranks_share_default_rng_but_not_tp_rng() -> tuple:
    """Dropout inside TP regions must differ per TP rank, replicated ops (drop path) must agree."""
    init_distributed(ParallelConfig(tensor_model_parallel_size=2), seed=3)
    try:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        default = torch.rand(3)
        with get_cuda_rng_tracker().fork():
            tp = torch.rand(3)
        return default, tp
    finally:
        destroy_distributed()
