"""The parts of the check, in the order they run, with their time limits; and the workers the parts start.
A new part: a module with its worker (if it runs our Python code) and a `part(timeout_s)`, listed here."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List

from sail_megatron.bench.gpu_check import (
    decode,
    fp8_vision,
    init_from,
    kernels_bench,
    layers,
    memory_check,
    moe_experts,
    probe,
    pytest_parts,
    restart,
    train_bench,
    vision_graphs,
)
from sail_megatron.bench.gpu_check.helpers import Figures
from sail_megatron.bench.gpu_check.runner import Part

# The whole check, from its start (environment probe and demo tokenizer included): 8 minutes, so that one
# call ends within the device's 10-minute command limit with the report written. A part is cut short when the
# budget runs out, and not started with less than 30 s of it left.
DEFAULT_BUDGET_S = 480

# Each part's limit is about twice the time it should take on one H100, so a part that hangs costs the others
# at most that much of the budget. The expected seconds are estimates until a report measures them; with
# ~15 s for the probe the default run's add up to ~490 s, about the budget: on a slower machine the last
# part (kernel-tests, partly compiled already by kernels-bench) is cut or skipped first; run it alone with
# --only. `restart` runs only when named (--only restart): it trains on CPU ranks, as CI does.
#   part            expected  limit
#   pytest-gpu         35 s    90 s   2 trainings of the tiny model (bf16, FP8), each in a fresh process
#   layers             40 s    90 s   4 models built twice (local, TE) and moved over through a checkpoint
#   moe-experts        35 s    75 s   2 MoE models the same way (the real-width one: 1.9B parameters, a 3.7 GB
#                                     checkpoint), each MoE layer compared, 7 timed steps of each kind
#   fp8-vision         30 s    90 s   4 models x 6 micro-batches, forward + backward
#   vision-graphs      30 s    75 s   2 real-width ViTs (InternViT-300M, SAILViT-Huge) at 1/4/16 tiles, eager
#                                     vs graphed, trainable + frozen; the tiny model under DDP
#   train-bf16         50 s   120 s   building SAIL-VL-2B, 3 warm-up + 5 measured steps + 1 breakdown step
#   train-fp8          50 s   120 s   the same in FP8
#   memory-model       35 s    90 s   building SAIL-VL-2B, 3 steps of 2 rows: measured memory vs `sail-bench plan`
#   kernels-bench      30 s    60 s   compiling and timing 4 Triton kernels
#   decode             20 s    45 s   DALI's pipeline build, 3 PIL and 10 DALI passes over 28 JPEGs
#   init-from          75 s   150 s   the CPU writer (5 models, fp32 reference logits; 2 min on 2 cores), then TE
#   restart           (45 s)  150 s   demo data (~7 s), then two launch attempts of 2 CPU ranks (42 s in all on a
#                                     2-core CPU); torchrun's own limit inside is 120 s
#   kernel-tests       45 s   120 s   every kernel's tests, compiled (partly cached by kernels-bench)


def default_parts() -> List[Part]:
    return [
        pytest_parts.pytest_gpu(90),
        layers.part(90),
        moe_experts.part(75),
        fp8_vision.part(90),
        vision_graphs.part(75),
        train_bench.train_bf16(120),
        train_bench.train_fp8(120),
        memory_check.part(90),
        kernels_bench.part(60),
        decode.part(45),
        init_from.part(150),
        restart.part(150),
        pytest_parts.kernel_tests(120),
    ]


# `python -m sail_megatron.bench.gpu_check worker NAME ...` runs one of these in a part's subprocess.
WORKERS: Dict[str, Callable[[Figures, Path], None]] = {
    "env": probe.worker,
    layers.NAME: layers.worker,
    moe_experts.NAME: moe_experts.worker,
    memory_check.NAME: memory_check.worker,
    fp8_vision.NAME: fp8_vision.worker,
    vision_graphs.NAME: vision_graphs.worker,
    kernels_bench.NAME: kernels_bench.worker,
    decode.NAME: decode.worker,
    init_from.WRITER: init_from.writer,
    init_from.NAME: init_from.worker,
    restart.NAME: restart.worker,
}
