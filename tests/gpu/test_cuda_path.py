"""The fast path on a GPU: NCCL, CUDA, Transformer Engine layers, no CPU stand-ins anywhere."""

import pytest

from sail_megatron.platform import cpu_emulation, detect_backends
from tests.gpu import workers
from tests.helpers.multiprocess import run_on_ranks

pytestmark = pytest.mark.gpu


def test_cpu_emulation_refuses_to_install_with_cuda():
    with pytest.raises(RuntimeError, match="must not be installed"):
        with cpu_emulation():
            pass


def test_bf16_training_uses_nccl_cuda_and_the_chosen_layers():
    (r,) = run_on_ranks(workers.train_tiny_on_gpu, 1)
    assert r["backend"] == "nccl" and r["param_device"] == "cuda" and not r["emulation"]
    expected = "TELayerNormColumnParallelLinear" if detect_backends().transformer_engine else "ColumnParallelLinear"
    assert r["qkv_class"] == expected
    assert r["losses_finite"]


@pytest.mark.skipif(not detect_backends().transformer_engine, reason="needs Transformer Engine")
def test_fp8_training_step():
    (r,) = run_on_ranks(workers.train_tiny_on_gpu, 1, "hybrid")
    assert r["layer_backend"] == "te" and r["losses_finite"]
