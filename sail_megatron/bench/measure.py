"""One benchmark variant: build the model, optimizer and data stream for a config, warm up, measure
throughput over untimed steps, then a phase breakdown over timed steps."""

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Dict

import torch
from megatron.core import parallel_state

from sail_megatron.bench.breakdown import StepTimers
from sail_megatron.bench.comm_count import CommCounter
from sail_megatron.bench.synthetic_rows import SyntheticRows, rows_config
from sail_megatron.config.train import TrainConfig
from sail_megatron.platform import read_dist_env
from sail_megatron.training.collectives import max_over_world, sum_over_data_parallel, sum_over_world
from sail_megatron.training.flops import PeakFlops, Trains, mfu_figures
from sail_megatron.training.metered_data import MeteredData, build_loader, from_loader
from sail_megatron.training.monitor import peak_memory_gib
from sail_megatron.training.startup import build_training
from sail_megatron.training.step import train_step


@dataclass
class BenchSettings:
    steps: int
    warmup: int
    breakdown_steps: int
    data: str  # synthetic | real
    peaks: PeakFlops = PeakFlops()
    """device_peak_flops(...): the bf16 peak and, for FP8 runs, the FP8 peak (MFU against both)."""


def _source(cfg: TrainConfig, tokenizer, settings: BenchSettings, device):
    if settings.data == "synthetic":
        dp_rank = parallel_state.get_data_parallel_rank()
        return iter(SyntheticRows(rows_config(cfg, seed=cfg.run.seed + dp_rank), device))
    return from_loader(*build_loader(cfg, tokenizer, device))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(cfg: TrainConfig, tokenizer, settings: BenchSettings) -> Dict:
    """Collective over all ranks; every rank returns the same figures."""
    env = read_dist_env()
    chunks, optimizer, scheduler = build_training(cfg, env.device)
    data = MeteredData(
        _source(cfg, tokenizer, settings, env.device),
        cfg.model,
        Trains.from_freeze(cfg.freeze),
        cfg.parallel.tensor_model_parallel_size,
        cfg.precision.tile_buckets(cfg.vision_max_tiles()),
    )
    num_micro = cfg.num_microbatches(env.world_size)

    def step():
        return train_step(chunks, optimizer, scheduler, data, num_micro, cfg.data.seq_length, cfg.data.micro_batch_size)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(settings.warmup):
        step()
    data.take_tally()
    times, losses, comm = [], [], CommCounter()
    with comm.counting():
        for _ in range(settings.steps):
            _sync()
            began = time.perf_counter()
            losses.append(step().loss)
            _sync()
            times.append(time.perf_counter() - began)
    tally = data.take_tally()
    timers = StepTimers(chunks, optimizer)
    breakdown = {}
    if settings.breakdown_steps:
        timers.enable()
        data.take_tally()
        for _ in range(settings.breakdown_steps):
            step()
        breakdown = timers.read(settings.breakdown_steps, data_wait_s=data.take_tally().wait_s)
        timers.disable()
    samples, tokens, slots, tiles, flops, vision_flops = sum_over_data_parallel(
        [tally.samples, tally.tokens, tally.slots, tally.tiles, tally.flops, tally.vision_flops]
    )
    wait, memory, decoded_max = max_over_world([tally.wait_s, peak_memory_gib(), tally.decoded_tiles])
    (decoded,) = sum_over_world([tally.decoded_tiles])
    total = sum(times)
    per_device = flops / total / env.world_size
    result = {
        "steps": settings.steps,
        "world_size": env.world_size,
        "step_time_s": {
            "mean": total / len(times),
            "median": statistics.median(times),
            "min": min(times),
            "max": max(times),
        },
        "tokens_per_s": tokens / total,
        "tokens_per_s_per_device": tokens / total / env.world_size,
        "samples_per_s": samples / total,
        "tiles_per_s": tiles / total,
        "tflops_per_s_per_device": per_device / 1e12,
        **mfu_figures(per_device, settings.peaks),
        "packing_utilization": tokens / slots if slots else None,
        "data_wait_frac": wait / total,
        "peak_memory_gib": memory,
        "breakdown_s_per_step": breakdown,
        "vision_flops_share": vision_flops / flops if flops else None,
        "vision_forward_s_per_step": breakdown.get("vision_forward"),
        "vision_parallel": cfg.parallel.vision_parallel,
        # What this rank handed to collectives, per micro-batch (rank 0's view; every rank of a layout
        # moves the same amounts): the layouts' communication side by side.
        "comm_bytes_per_micro_batch": comm.per(settings.steps * num_micro),
        "decoded_tiles_per_rank_per_step": {
            "max": decoded_max / settings.steps,
            "mean": decoded / (env.world_size // cfg.parallel.pipeline_model_parallel_size) / settings.steps,
        },
        "final_loss": losses[-1] if losses else None,
    }
    chunks = optimizer = scheduler = data = None  # drop the model before the next variant builds its own
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result
