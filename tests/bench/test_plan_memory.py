"""The planner's model state (sail_megatron/bench/plan/model_state.py) against built models: weights, gradient
buffers and optimizer state of the tiny presets, built and stepped through the project's own builders
(`build_training`) on the CPU, summed from the tensors megatron-core actually allocated, equal to the byte.

One process: every preset (the mixture-of-experts one included) x fp32/bf16/fp16 x distributed optimizer
on/off x three freezing stages. Two processes (one spawn): TP=2, PP=2 (a tied embedding split over the
stages), DP=2 with the distributed optimizer (each rank's slice), DP=2 with small DDP buckets (megatron's
bucket padding), and expert parallelism EP=2 (experts in buffers of their own, over their own ranks)."""

import itertools
from typing import Dict, List, Tuple

import pytest
import torch

from sail_megatron.bench.plan.model_state import (
    ddp_bucket_size,
    stage_parameters,
    state_bytes_of_rank,
    state_bytes_per_rank,
)
from tests.helpers.multiprocess import free_port, run_on_ranks

PRESETS = ("tiny", "tiny-aimv2", "tiny-sail-vl2", "tiny-sail-vl2-moe")
DTYPES = ("fp32", "bf16", "fp16")
STAGES = (("vision", "projector", "language"), ("projector",), ("vision", "projector"))  # SFT, alignment, advance


def _storage(t: torch.Tensor) -> Tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def measured_state(chunks, optimizer) -> Dict[str, int]:
    """Bytes of the distinct storages behind the parameters, DDP's gradient buffers (and any .grad), and
    the optimizer's own tensors (fp32 main weights that are not model weights, exp_avg, exp_avg_sq)."""
    seen, out = set(), {"weights": 0, "grads": 0, "optimizer": 0}

    def add(kind: str, t: torch.Tensor) -> None:
        key, nbytes = _storage(t)
        if key not in seen:
            seen.add(key)
            out[kind] += nbytes

    models = [c.module for c in chunks]
    for m in models:
        for p in m.parameters():
            add("weights", p.data)
    for c in chunks:
        for buffer in c.buffers + c.expert_parallel_buffers:
            add("grads", buffer.grad_data)
    for m in models:
        for p in m.parameters():
            if p.grad is not None:
                add("grads", p.grad)
    keys = set()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if inner is None:  # a stage that trains nothing
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                add("optimizer", p)
        for state in inner.state.values():
            keys |= set(state)
            for name in ("exp_avg", "exp_avg_sq"):
                if name in state:
                    add("optimizer", state[name])
    # Nothing else lives in the optimizer state: its step counters are left out on purpose (bench/plan/model_state.py).
    assert keys <= {"exp_avg", "exp_avg_sq", "step"}, keys
    return out


def _config(preset: str, dtype: str, distributed_optimizer: bool, trainable, tp: int = 1, pp: int = 1, ep: int = 1):
    from sail_megatron.config import FreezeConfig, ParallelConfig, PrecisionConfig
    from sail_megatron.config.train import TrainConfig
    from sail_megatron.data.synthetic import IMG_CONTEXT
    from sail_megatron.model.presets import get_preset

    model = get_preset(preset)
    model.image_context_token_id = IMG_CONTEXT
    cfg = TrainConfig(
        model_preset=preset,
        model=model,
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            use_distributed_optimizer=distributed_optimizer,
            overlap_grad_reduce=True,  # as the GPU recipes: bucketed (one bucket for a tiny model)
        ),
        precision=PrecisionConfig(dtype=dtype, layers="local"),
        freeze=FreezeConfig(list(trainable)),
    )
    cfg.run.train_steps = 10  # a budget for the lr schedule
    return cfg


def _zero_grad_step(chunks, optimizer) -> None:
    """One optimizer step on zero gradients: Adam allocates its state lazily, at the first step."""
    for c in chunks:
        for buffer in c.buffers:
            buffer.grad_data.zero_()
    optimizer.step()


def build_and_measure(preset, dtype, distributed_optimizer, trainable, tp=1, pp=1, ep=1) -> Dict:
    """Build through build_training on this rank's layout, step once, and compare with the planner."""
    from megatron.core import parallel_state

    from sail_megatron.bench.plan.model_state import buffer_layout
    from sail_megatron.training.startup import build_training

    cfg = _config(preset, dtype, distributed_optimizer, trainable, tp, pp, ep)
    chunks, optimizer, _ = build_training(cfg, torch.device("cpu"))
    _zero_grad_step(chunks, optimizer)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    edp = parallel_state.get_expert_data_parallel_world_size()
    bucket = ddp_bucket_size(True, dp, stage)
    params = stage_parameters(cfg.model, tp, pp, stage, ep)
    expected = state_bytes_of_rank(
        params,
        trainable,
        dtype,
        distributed_optimizer,
        dp,
        bucket,
        parallel_state.get_data_parallel_rank(),
        edp,
        parallel_state.get_expert_data_parallel_rank(),
    )
    trained = [p for p in params if p.part in trainable]
    planned = [
        b
        for group, size in ((False, dp), (True, edp))
        for b in buffer_layout(
            [p for p in trained if p.expert_parallel == group], distributed_optimizer, size, bucket
        ).buckets
    ]
    built = [tuple(b) for buf in chunks[0].buffers + chunks[0].expert_parallel_buffers for b in buf.bucket_indices]
    return {
        "names": [(n, p.numel()) for n, p in chunks[0].module.named_parameters()],
        "planned_names": [(p.name, p.numel) for p in params],
        "expert_buffers": len(chunks[0].expert_parallel_buffers),
        "buckets": (built, planned),
        "measured": measured_state(chunks, optimizer),
        "expected": {"weights": expected.weights, "grads": expected.grads, "optimizer": expected.optimizer},
    }


@pytest.fixture(scope="module")
def one_process():
    from sail_megatron.config import ParallelConfig
    from sail_megatron.platform import destroy_distributed, init_distributed

    with pytest.MonkeyPatch.context() as mp:
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0")):
            mp.setenv(key, value)
        mp.setenv("WORLD_SIZE", "1")
        init_distributed(ParallelConfig())
        try:
            yield
        finally:
            destroy_distributed()


@pytest.mark.parametrize("preset", PRESETS)
def test_state_bytes_equal_built_models_in_one_process(one_process, preset):
    wrong = []
    for dtype, distopt, trainable in itertools.product(DTYPES, (False, True), STAGES):
        r = build_and_measure(preset, dtype, distopt, trainable)
        assert r["names"] == r["planned_names"]  # the same tensors, in registration order
        assert r["buckets"][0] == r["buckets"][1]
        if r["measured"] != r["expected"]:
            wrong.append(f"{dtype} distopt={distopt} {'+'.join(trainable)}: {r['measured']} != {r['expected']}")
    assert not wrong, "\n".join(wrong)


# --- two processes ---------------------------------------------------------------------------------------------

TWO_RANK_CASES = {
    # (tp, pp, ep): [(preset, dtype, distributed optimizer, trainable)]
    (2, 1, 1): [
        ("tiny", "bf16", True, STAGES[0]),
        ("tiny-sail-vl2", "fp32", False, STAGES[2]),
        ("tiny-aimv2", "fp16", True, STAGES[1]),
    ],
    (1, 2, 1): [
        ("tiny-sail-vl2", "bf16", True, STAGES[0]),  # the tied embedding on both stages, in buckets of its own
        ("tiny", "fp32", False, STAGES[2]),  # the second stage trains nothing
    ],
    (1, 1, 2): [  # EP=2 on DP=2: each rank holds half the experts, which no other rank shares
        ("tiny-sail-vl2-moe", "bf16", True, STAGES[0]),
        ("tiny-sail-vl2-moe", "fp32", False, STAGES[0]),
    ],
    (1, 1, 1): [  # DP=2: each rank keeps optimizer state for its slice of every bucket
        ("tiny", "bf16", True, STAGES[0]),
        ("tiny-aimv2", "fp16", True, STAGES[2]),
        ("tiny-sail-vl2", "fp32", True, STAGES[0]),
        ("tiny", "bf16", False, STAGES[1]),
    ],
}
SMALL_BUCKET = 20_000  # elements: the tiny model's trained parameters fill several buckets


def _small_buckets() -> Dict:
    """DDP with small buckets (its bucket_size; our recipes leave it to megatron) and the distributed
    optimizer at DP=2: buffer layout and per-rank state against the planner's."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from sail_megatron.bench.plan.model_state import buffer_layout
    from sail_megatron.model.build import build_model
    from sail_megatron.training.freezing import apply_freezing
    from sail_megatron.training.optimizer import build_optimizer

    cfg = _config("tiny-sail-vl2", "bf16", True, STAGES[0])
    model = build_model(cfg.model, cfg.parallel, cfg.precision)
    apply_freezing(model, cfg.freeze)
    ddp = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True, bucket_size=SMALL_BUCKET
    )
    chunks = [DistributedDataParallel(config=model.config, ddp_config=ddp, module=model)]
    optimizer = build_optimizer(chunks, cfg.optim, cfg.parallel, cfg.precision)
    _zero_grad_step(chunks, optimizer)
    params = stage_parameters(cfg.model)
    (buffer,) = chunks[0].buffers
    layout = buffer_layout(params, True, 2, SMALL_BUCKET)
    index = {name: i for i, name in enumerate(p.name for p in params)}
    built = {name: buffer.param_index_map[p][:2] for name, p in model.named_parameters()}
    expected = state_bytes_per_rank(params, STAGES[0], "bf16", True, 2, SMALL_BUCKET)
    return {
        "buckets": ([tuple(b) for b in buffer.bucket_indices], list(layout.buckets)),
        "ranges": (built, {name: layout.param_ranges[i] for name, i in index.items()}),
        "measured": measured_state(chunks, optimizer),
        "expected": dataclass_dict(expected[parallel_state.get_data_parallel_rank()]),
    }


def dataclass_dict(s) -> Dict[str, int]:
    return {"weights": s.weights, "grads": s.grads, "optimizer": s.optimizer}


def two_rank_cases() -> List:
    from megatron.core import parallel_state, tensor_parallel

    from sail_megatron.config import ParallelConfig
    from sail_megatron.platform import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(), seed=3)
    out = []
    try:
        for (tp, pp, ep), cases in TWO_RANK_CASES.items():
            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
            )
            tensor_parallel.model_parallel_cuda_manual_seed(3)
            for preset, dtype, distopt, trainable in cases:
                label = f"TP={tp} PP={pp} EP={ep} {preset} {dtype} distopt={distopt} {'+'.join(trainable)}"
                out.append((label, build_and_measure(preset, dtype, distopt, trainable, tp, pp, ep)))
        out.append(("DP=2 small buckets", _small_buckets()))
    finally:
        destroy_distributed()
    return out


def test_state_bytes_equal_built_models_under_tp_pp_and_dp():
    ranks = run_on_ranks(two_rank_cases, 2, timeout=300)
    wrong = []
    for rank, cases in enumerate(ranks):
        for label, r in cases:
            if "names" in r and r["names"] != r["planned_names"]:
                wrong.append(f"rank {rank} {label}: parameters {r['names']} != {r['planned_names']}")
            if r["buckets"][0] != r["buckets"][1] or r.get("ranges", (0, 0))[0] != r.get("ranges", (0, 0))[1]:
                wrong.append(f"rank {rank} {label}: buffer layout {r['buckets'][0]} != {r['buckets'][1]}")
            if r["measured"] != r["expected"]:
                wrong.append(f"rank {rank} {label}: {r['measured']} != {r['expected']}")
    assert not wrong, "\n".join(wrong)
    # The cases exercise what they are meant to: ranks hold different slices, stages different parameters.
    by_label = [dict(cases) for cases in ranks]
    dp2 = "TP=1 PP=1 EP=1 tiny bf16 distopt=True vision+projector+language"
    assert by_label[0][dp2]["measured"]["optimizer"] != by_label[1][dp2]["measured"]["optimizer"]
    pp2 = "TP=1 PP=2 EP=1 tiny-sail-vl2 bf16 distopt=True vision+projector+language"
    assert by_label[0][pp2]["names"] != by_label[1][pp2]["names"]
    # The tied embedding in a bucket of its own on both stages (the first stage's layers before it, the
    # vision side after it, in DDP's reversed order).
    assert [len(by_label[r][pp2]["buckets"][0]) for r in (0, 1)] == [3, 2]
    assert len(by_label[0]["DP=2 small buckets"]["buckets"][0]) > 3
    ep2 = "TP=1 PP=1 EP=2 tiny-sail-vl2-moe bf16 distopt=True vision+projector+language"
    assert by_label[0][ep2]["expert_buffers"] == 1  # the experts left the dense buffer
