"""The CPU stand-ins for megatron-core's CUDA-only calls."""

import torch

from tests.helpers.multiprocess import run_on_ranks
from tests.platform import workers


def test_cuda_calls_map_to_the_cpu():
    (r,) = run_on_ranks(workers.cpu_emulation_behaviour, 1)
    assert r["backend"] == "gloo" and r["installed"]
    assert r["literal_device"] == "cpu" and r["to_cuda"] == "cpu" and r["dot_cuda_is_identity"]
    assert r["current_device"] == "cpu"
    assert r["type_name"] == "torch.cuda.FloatTensor"
    assert r["int_type_unchanged"] == "torch.LongTensor"


def test_rng_tracker_is_backed_by_the_cpu_generator():
    (r,) = run_on_ranks(workers.cpu_emulation_behaviour, 1)
    assert r["default_stream_untouched"], "forking the model-parallel RNG must restore the default stream"
    assert r["forked_differs"] and r["forked_advances"]


def test_tensor_parallel_rng_streams():
    (d0, t0), (d1, t1) = run_on_ranks(workers.tp_ranks_share_default_rng_but_not_tp_rng, 2)
    assert torch.equal(d0, d1), "the default stream is the same on every TP rank"
    assert not torch.equal(t0, t1), "the model-parallel stream differs per TP rank"
