"""sail-bench's variants and table, without running a model: what is skipped and why, MFU columns."""

import pytest

from sail_megatron.bench import cli
from sail_megatron.bench.report import table
from sail_megatron.config import ParallelConfig
from sail_megatron.config.train import TrainConfig
from sail_megatron.model.presets import get_preset
from sail_megatron.platform.backends import Backends

GPU_WITH_TE = Backends(cuda=True, transformer_engine=True, apex=True, cuda_capability=(9, 0))


def _recipe(sequence_parallel: bool) -> TrainConfig:
    cfg = TrainConfig(model=get_preset("tiny"))
    cfg.parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
    return cfg


@pytest.fixture
def on_gpu_with_te(monkeypatch):
    monkeypatch.setattr(cli, "detect_backends", lambda: GPU_WITH_TE)


def test_local_layers_are_skipped_under_sequence_parallelism(on_gpu_with_te):
    # megatron-core's local layers cannot run SP (torch norms), apex or not: said, not attempted.
    why = {name: why for name, _, _, why in cli._variants(_recipe(True), ["layers"], "synthetic")}
    assert why["te-layers"] == ""
    assert why["local-layers"].startswith("parallel.sequence_parallel:") and "Fix:" in why["local-layers"]


def test_both_layers_run_without_sequence_parallelism(on_gpu_with_te):
    variants = cli._variants(_recipe(False), ["layers"], "synthetic")
    assert [(name, cfg.precision.layers, why) for name, cfg, _, why in variants] == [
        ("te-layers", "te", ""),
        ("local-layers", "local", ""),
    ]


def test_layers_need_cuda_and_te(monkeypatch):
    monkeypatch.setattr(cli, "detect_backends", lambda: Backends(cuda=False, transformer_engine=False, apex=False))
    assert {why for *_, why in cli._variants(_recipe(False), ["layers"], "synthetic")} == {
        "needs CUDA and Transformer Engine"
    }


def _result(mfu, mfu_fp8):
    return {
        "step_time_s": {"median": 0.5},
        "tokens_per_s_per_device": 1000.0,
        "tflops_per_s_per_device": 400.0,
        "mfu": mfu,
        "mfu_fp8": mfu_fp8,
        "packing_utilization": 0.95,
        "data_wait_frac": 0.01,
        "peak_memory_gib": 40.0,
        "breakdown_s_per_step": {},
    }


def test_table_shows_mfu_against_both_peaks():
    lines = table({"fp8": _result(0.404, 0.202), "bf16": _result(0.5, None), "local-layers": {"skipped": "why"}})
    assert "MFU fp8" in lines.splitlines()[0]
    assert "40.4%" in lines and "20.2%" in lines and "50.0%" in lines and "skipped: why" in lines
