"""The project's changes to megatron-core are scoped, and re-checked whenever megatron changes under them."""

import hashlib
import importlib.metadata
import inspect

import torch

from sail_megatron.platform import cpu_emulation, cpu_emulation_installed
from sail_megatron.platform.megatron_compat import (
    MEGATRON_VERSION,
    megatron_on_cpu,
    patched_originals,
    torch_adam_checkpoints,
)

# The source of each megatron function replaced in megatron_compat.py, as written against MEGATRON_VERSION.
# A change here means megatron changed that function: read the new one, adapt the patch, update the hash.
SOURCE_HASHES = {
    "transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu": "8fc5847a887d7319",
    "moe_utils.RouterGatingLinearFunction.forward": "dcba4f9f02b30a36",
    "moe_utils.RouterGatingLinearFunction.backward": "222f6d592730bd28",
    "dist_checkpointing.filesystem_async._get_write_results_queue": "349269cbdd569d41",
    "tensor_parallel.random._get_cuda_rng_state": "aa26caaa069c5c4f",
    "tensor_parallel.random._set_cuda_rng_state": "b179c9d95438b61c",
    "transformer.utils.get_default_causal_mask": "4638b2c6665fc284",
    "fusions.fused_softmax.get_default_causal_mask": "4638b2c6665fc284",
    "DistributedOptimizer._set_main_param_and_optimizer_states": "93c254228283b2df",
    "DistributedOptimizer.state_dict": "fe621ae6a622b587",
}


def _source_hash(fn) -> str:
    return hashlib.sha256(inspect.getsource(inspect.unwrap(fn)).encode()).hexdigest()[:16]


def test_written_for_the_installed_megatron():
    assert importlib.metadata.version("megatron-core") == MEGATRON_VERSION


def test_patched_functions_are_the_ones_the_patches_were_written_for():
    current = {name: _source_hash(fn) for name, fn in patched_originals()}
    changed = [name for name, digest in SOURCE_HASHES.items() if current.get(name) != digest]
    assert set(current) == set(SOURCE_HASHES) and not changed, f"megatron changed: {changed}"


def test_patches_end_with_their_scope():
    before = patched_originals()
    with megatron_on_cpu, torch_adam_checkpoints:
        with megatron_on_cpu:  # nested: still patched after the inner exit
            pass
        assert megatron_on_cpu.active
    assert [fn for _, fn in patched_originals()] == [fn for _, fn in before]


def test_cpu_layer_is_scoped():
    current_device = torch.cuda.current_device
    with cpu_emulation():
        assert cpu_emulation_installed() and torch.zeros(1, device="cuda").device.type == "cpu"
    assert not cpu_emulation_installed() and torch.cuda.current_device is current_device
