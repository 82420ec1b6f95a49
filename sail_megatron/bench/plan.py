"""`sail-bench plan --config RECIPE.yaml --gpus N [--gpu h100|h200|a100] [--mfu F | --measured REPORT.json]
[--tokens-per-sample T] [--headroom H] [--json] [--all] [key=value ...]`

Plans a recipe's stage on N GPUs without building anything (seconds, no GPU, no torch.distributed): every
layout the recipe's own checks accept (tensor parallel 1/2/4/8, pipeline parallel 1/2/4/..., the micro-batch
sizes the data settings allow, recomputation on or off, distributed optimizer on or off), with its memory per
GPU, whether that fits, tokens/s per GPU, GPU-hours and days for the stage's budget; and the layout it would
pick, with why. What is exact and what is assumed: docs/design.md, "Planning a cluster run".
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sail_megatron.bench.memory_model import (
    GIB,
    ActivationSettings,
    activation_bytes,
    ddp_bucket_size,
    loader_device_bytes,
    stage_parameters,
    state_bytes,
)
from sail_megatron.bench.synthetic_rows import caption_like, sft_like
from sail_megatron.config import ConfigError
from sail_megatron.config.counts import format_count
from sail_megatron.config.train import TrainConfig, load_train_config
from sail_megatron.data.packing import plan_packs
from sail_megatron.model.param_count import count_parameters
from sail_megatron.training.flops import FlopBreakdown, Trains, peak_flops, training_flops, training_multipliers

TENSOR_PARALLEL = (1, 2, 4, 8)
MICRO_BATCH_SIZES = (1, 2, 4)
DEFAULT_MFU = 0.40
DEFAULT_HEADROOM = 0.10
TIE = 0.005
"""Layouts within 0.5% of the fastest count as equally fast."""
SAMPLES = 4096
"""Synthetic samples the data assumptions are drawn from (seed 0)."""
TABLE_ROWS = 12


@dataclass(frozen=True)
class Gpu:
    name: str
    device_name: str
    """What torch.cuda.get_device_name() says (the peak-FLOP/s table is keyed by it)."""
    memory_bytes: int
    """Total memory as nvidia-smi reports it."""


GPUS = {
    "h100": Gpu("H100 SXM 80GB", "NVIDIA H100 80GB HBM3", 81559 * 2**20),
    "h200": Gpu("H200 141GB", "NVIDIA H200", 143771 * 2**20),
    "a100": Gpu("A100 SXM 80GB", "NVIDIA A100-SXM4-80GB", 81920 * 2**20),
}


class PlanError(Exception):
    """A bad flag or recipe: (flag, message); the command exits with code 2."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


# --- what the data looks like ---------------------------------------------------------------------------


@dataclass
class DataAssumption:
    kind: str
    """'caption-like' or 'SFT-like' (the synthetic distributions of bench/synthetic_rows.py)."""
    why: str
    mean_tokens_per_sample: float
    mean_tiles_per_sample: float
    image_token_fraction: float
    """<IMG_CONTEXT> tokens over all tokens."""
    packed: bool
    utilization: float
    """Real tokens over token slots of the rows."""
    mean_tokens_per_row: float
    mean_tiles_per_row: float
    worst_tiles_per_row: int
    """What the memory estimate assumes for one row: data.max_tiles_per_pack when packing (the packer's
    bound), else the largest sample of the distribution."""
    rows: List[Tuple[List[int], int]] = field(repr=False, default_factory=list)
    """(sample lengths, tiles) of each row, for the FLOP count."""

    def describe(self) -> str:
        rows = (
            f"packed rows: {100 * self.utilization:.1f}% of token slots filled, {self.mean_tiles_per_row:.1f} tiles "
            f"per row on average, {self.worst_tiles_per_row} at most (data.max_tiles_per_pack)"
            if self.packed
            else f"one sample per row: {100 * self.utilization:.1f}% of token slots filled"
        )
        return (
            f"{self.kind} samples ({self.why}): {self.mean_tokens_per_sample:.0f} tokens and "
            f"{self.mean_tiles_per_sample:.2f} tiles per sample, {100 * self.image_token_fraction:.0f}% image "
            f"tokens; {rows}"
        )


def stage_kind(cfg: TrainConfig) -> Tuple[str, str]:
    """Which synthetic distribution stands for the stage's data, and why."""
    if "language" in cfg.freeze.trainable:
        return "SFT-like", "the language model trains: an SFT stage"
    return "caption-like", "the language model is frozen: a pretraining stage"


def data_assumption(cfg: TrainConfig) -> DataAssumption:
    """The stage's data as the synthetic distribution of its kind, packed as the loader would pack it
    (buffers of data.packing_buffer_size samples planned with plan_packs)."""
    kind, why = stage_kind(cfg)
    make = sft_like if kind == "SFT-like" else caption_like
    tokens, tiles = make(SAMPLES, seed=0, tokens_per_tile=cfg.model.tokens_per_tile)
    d = cfg.data
    keep = (tokens <= d.seq_length) & (tiles <= d.max_tiles_per_pack)  # the encoder cuts or skips the rest
    tokens, tiles = tokens[keep], tiles[keep]
    if not len(tokens):
        raise PlanError("data.seq_length", f"{d.seq_length} tokens hold none of the assumed {kind} samples")
    rows: List[Tuple[List[int], int]] = []
    if d.packing:
        for start in range(0, len(tokens), d.packing_buffer_size):
            tok, til = tokens[start : start + d.packing_buffer_size], tiles[start : start + d.packing_buffer_size]
            plan = plan_packs(tok, til, d.seq_length, d.max_tiles_per_pack)
            rows += [([int(tok[i]) for i in pack], int(til[pack].sum())) for pack in plan.packs]
        worst = d.max_tiles_per_pack
    else:
        rows = [([int(n)], int(t)) for n, t in zip(tokens, tiles)]
        worst = int(tiles.max())
    row_tokens = np.array([sum(lengths) for lengths, _ in rows])
    return DataAssumption(
        kind=kind,
        why=why,
        mean_tokens_per_sample=float(tokens.mean()),
        mean_tiles_per_sample=float(tiles.mean()),
        image_token_fraction=float((tiles * cfg.model.tokens_per_tile).sum() / tokens.sum()),
        packed=d.packing,
        utilization=float(row_tokens.mean() / d.seq_length),
        mean_tokens_per_row=float(row_tokens.mean()),
        mean_tiles_per_row=float(np.mean([t for _, t in rows])),
        worst_tiles_per_row=worst,
        rows=rows,
    )


# --- the budget ----------------------------------------------------------------------------------------------


@dataclass
class BudgetTokens:
    tokens: float
    description: str


def budget_tokens(cfg: TrainConfig, data: DataAssumption, tokens_per_sample: Optional[float]) -> BudgetTokens:
    budget = cfg.run.budget()  # a ConfigError unless exactly one of train_steps/tokens/samples is set
    unit, amount = budget.unit, budget.amount
    if unit == "tokens":
        return BudgetTokens(amount, f"{format_count(amount)} tokens (run.train_tokens)")
    if unit == "samples":
        if tokens_per_sample is not None:
            per, source = tokens_per_sample, "--tokens-per-sample"
        else:
            per, source = data.mean_tokens_per_sample, f"the {data.kind} mean"
        return BudgetTokens(
            amount * per, f"{format_count(amount)} samples (run.train_samples) x {per:.0f} tokens per sample ({source})"
        )
    per_step = cfg.run.global_batch_size * data.mean_tokens_per_row
    return BudgetTokens(
        amount * per_step,
        f"{amount} steps (run.train_steps) x {cfg.run.global_batch_size} rows x {data.mean_tokens_per_row:.0f} "
        f"tokens per row ({cfg.data.seq_length} slots, {100 * data.utilization:.1f}% filled with the assumed "
        f"{data.kind} samples)",
    )


# --- FLOPs -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowFlops:
    """Mean FLOPs of one row of the assumed data (a micro-batch of micro_batch_size 1), whole model."""

    model: FlopBreakdown
    """Model FLOPs (training/flops.py): real tokens only. What MFU is quoted on."""
    executed: FlopBreakdown
    """What the GPUs run: the language model over the whole row, padding included (a packed row's tail
    is a segment of its own; an unpacked row is one padded sequence)."""
    output_layer: float
    """Executed training FLOPs of the output layer (last stage only)."""
    output_layer_forward: float


def _mean(total: FlopBreakdown, n: int) -> FlopBreakdown:
    return FlopBreakdown(*(getattr(total, f.name) / n for f in dataclasses.fields(total)))


def row_flops(cfg: TrainConfig, data: DataAssumption, tp: int) -> RowFlops:
    trains = Trains.from_freeze(cfg.freeze)
    seq = cfg.data.seq_length
    model = executed = FlopBreakdown()
    for lengths, tiles in data.rows:
        model = model + training_flops(cfg.model, lengths, tiles, trains, tp)
        pad = seq - sum(lengths)
        segments = (lengths + [pad] if pad else lengths) if data.packed else [seq]
        executed = executed + training_flops(cfg.model, segments, tiles, trains, tp)
    n = len(data.rows)
    lang = cfg.model.language
    out_fwd = 2 * lang.hidden_size * lang.padded_vocab_size(tp) * seq
    return RowFlops(_mean(model, n), _mean(executed, n), training_multipliers(trains).language * out_fwd, out_fwd)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    num_microbatches: int
    recompute_granularity: Optional[str]
    recompute_method: str
    recompute_num_layers: int
    recompute_vision: bool
    distributed_optimizer: bool
    sequence_parallel: bool

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp


def stage_flops(cfg: TrainConfig, f: RowFlops, layout: Layout) -> Tuple[List[float], float]:
    """(executed FLOPs of each pipeline stage per micro-batch, model FLOPs per micro-batch): padding and
    recomputation add work that model FLOPs do not count."""
    t = f.executed
    lang_layers = t.language - f.output_layer
    layers_fwd = t.language_linear_forward - f.output_layer_forward + t.language_attention_forward
    per_stage_layers = cfg.model.language.num_layers // layout.pp
    extra_lang = 0.0
    if layout.recompute_granularity == "full":
        share = 1.0
        if layout.recompute_method == "block":
            share = min(layout.recompute_num_layers, per_stage_layers) / per_stage_layers
        extra_lang = share * layers_fwd
    elif layout.recompute_granularity == "selective":
        extra_lang = t.language_attention_forward
    trains_vision = "vision" in cfg.freeze.trainable
    extra_vision = t.vision_forward if (layout.recompute_vision and trains_vision) else 0.0
    mbs = layout.micro_batch_size
    stages = []
    for s in range(layout.pp):
        work = (lang_layers + extra_lang) / layout.pp
        if s == 0:
            work += t.vision + t.projector + extra_vision
        if s == layout.pp - 1:
            work += f.output_layer
        stages.append(mbs * work)
    return stages, mbs * f.model.total


# --- memory ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    weights: int
    grads: int
    optimizer: int
    activations: int
    loader: int
    stage: int
    """The pipeline stage with the most memory (the one reported)."""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.loader

    def split_gib(self) -> Dict[str, float]:
        return {k: getattr(self, k) / GIB for k in ("weights", "grads", "optimizer", "activations", "loader")}


class MemoryModel:
    """Memory of the busiest stage of a layout (model state memoized per sharding)."""

    def __init__(self, cfg: TrainConfig, data: DataAssumption):
        self.cfg, self.data = cfg, data
        self._state: Dict[Tuple, Any] = {}

    def _state_of(self, layout: Layout, stage: int):
        key = (layout.tp, layout.pp, stage, layout.distributed_optimizer, layout.dp)
        if key not in self._state:
            cfg = self.cfg
            self._state[key] = state_bytes(
                stage_parameters(cfg.model, layout.tp, layout.pp, stage),
                cfg.freeze.trainable,
                cfg.precision.dtype,
                layout.distributed_optimizer,
                layout.dp,
                ddp_bucket_size(cfg.parallel.overlap_grad_reduce, layout.dp, stage),
            )
        return self._state[key]

    def of(self, layout: Layout, tiles_per_row: Optional[int] = None) -> Memory:
        """tiles_per_row: the tiles of the micro-batch's rows (default: the worst case the data allows)."""
        cfg = self.cfg
        tokens = layout.micro_batch_size * cfg.data.seq_length
        per_row = self.data.worst_tiles_per_row if tiles_per_row is None else tiles_per_row
        tiles = layout.micro_batch_size * per_row
        best = None
        for stage in range(layout.pp):
            state = self._state_of(layout, stage)
            act = activation_bytes(
                cfg.model,
                ActivationSettings(
                    tp=layout.tp,
                    pp=layout.pp,
                    stage=stage,
                    sequence_parallel=layout.sequence_parallel,
                    recompute_granularity=layout.recompute_granularity,
                    recompute_method=layout.recompute_method,
                    recompute_num_layers=layout.recompute_num_layers,
                    recompute_vision=layout.recompute_vision,
                    dtype=cfg.precision.dtype,
                    trainable=tuple(cfg.freeze.trainable),
                ),
                tokens,
                tiles,
                layout.num_microbatches,
            )
            loader = loader_device_bytes(tokens, tiles, cfg.model.vision.image_size, stage == 0)
            memory = Memory(state.weights, state.grads, state.optimizer, act.total, loader, stage)
            if best is None or memory.total > best.total:
                best = memory
        return best


# --- layouts -----------------------------------------------------------------------------------------------


def _recompute_options(cfg: TrainConfig) -> List[Tuple[Optional[str], str, int]]:
    """The recipe's own language-model recomputation, and full recomputation (or none, when the recipe
    already recomputes fully)."""
    p = cfg.parallel
    own = (p.recompute_granularity, p.recompute_method, p.recompute_num_layers)
    other = (None, "uniform", 1) if p.recompute_granularity == "full" else ("full", "uniform", 1)
    return [own, other]


def candidate_layouts(cfg: TrainConfig, gpus: int) -> Tuple[List[Layout], List[str]]:
    """Every layout the recipe's checks accept on `gpus` GPUs, and why the others were left out (one line
    per reason, naming the layouts it refused)."""
    layers = cfg.model.language.num_layers
    pipeline = [2**k for k in range(int(math.log2(layers)) + 1)]
    vision_options = [False, True] if "vision" in cfg.freeze.trainable else [False]
    out: List[Layout] = []
    refused: Dict[str, List[str]] = {}
    for tp in TENSOR_PARALLEL:
        for pp in pipeline:
            for mbs in MICRO_BATCH_SIZES:
                for granularity, method, num_layers in _recompute_options(cfg):
                    for vision in vision_options:
                        for distopt in (True, False):
                            parallel = dataclasses.replace(
                                cfg.parallel,
                                tensor_model_parallel_size=tp,
                                pipeline_model_parallel_size=pp,
                                sequence_parallel=cfg.parallel.sequence_parallel and tp > 1,
                                recompute_granularity=granularity,
                                recompute_method=method,
                                recompute_num_layers=num_layers,
                                recompute_vision=vision,
                                use_distributed_optimizer=distopt,
                            )
                            trial = copy.copy(cfg)
                            trial.parallel = parallel
                            trial.data = dataclasses.replace(
                                cfg.data, micro_batch_size=mbs, tokenizer=cfg.data.tokenizer or "unused"
                            )
                            try:
                                parallel.validate(cfg.model, gpus)
                                trial.data.validate(needs_path=False)
                                micro = trial.num_microbatches(gpus)
                            except ConfigError as e:
                                where = f"TP={tp} PP={pp} micro-batch {mbs}"
                                if where not in refused.setdefault(str(e), []):
                                    refused[str(e)].append(where)
                                continue
                            out.append(
                                Layout(
                                    tp=tp,
                                    pp=pp,
                                    dp=parallel.data_parallel_size(gpus),
                                    micro_batch_size=mbs,
                                    num_microbatches=micro,
                                    recompute_granularity=granularity,
                                    recompute_method=method,
                                    recompute_num_layers=num_layers,
                                    recompute_vision=vision,
                                    distributed_optimizer=distopt,
                                    sequence_parallel=parallel.sequence_parallel,
                                )
                            )
    return out, [f"{reason} ({', '.join(where)})" for reason, where in refused.items()]


# --- throughput --------------------------------------------------------------------------------------------


@dataclass
class Throughput:
    """How fast the GPUs are assumed to work: `utilization` of the peak on the FLOPs they execute."""

    utilization: float
    peak: float
    description: str
    measured: Optional[Dict[str, Any]] = None


def tokens_per_s_per_gpu(
    cfg: TrainConfig, data: DataAssumption, flops: RowFlops, layout: Layout, gpus: int, speed: Throughput
) -> Tuple[float, float]:
    """(tokens/s per GPU, the model-FLOPs utilization that means). A step runs num_microbatches + pp - 1
    micro-batch slots of the slowest stage (1F1B: the pipeline fills and drains once per step)."""
    stages, model = stage_flops(cfg, flops, layout)
    slot_s = max(stages) / (layout.tp * speed.peak * speed.utilization)
    step_s = (layout.num_microbatches + layout.pp - 1) * slot_s
    tokens_per_step = cfg.run.global_batch_size * data.mean_tokens_per_row
    rate = tokens_per_step / step_s / gpus
    per_token = model / (layout.micro_batch_size * data.mean_tokens_per_row)
    return rate, rate * per_token / speed.peak


def recipe_layout(cfg: TrainConfig, gpus: int) -> Layout:
    """The layout the recipe itself sets, on `gpus` GPUs."""
    p = cfg.parallel
    return Layout(
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        dp=p.data_parallel_size(gpus),
        micro_batch_size=cfg.data.micro_batch_size,
        num_microbatches=cfg.num_microbatches(gpus),
        recompute_granularity=p.recompute_granularity,
        recompute_method=p.recompute_method,
        recompute_num_layers=p.recompute_num_layers,
        recompute_vision=p.recompute_vision,
        distributed_optimizer=p.use_distributed_optimizer,
        sequence_parallel=p.sequence_parallel,
    )


def _layout_of_report(doc: Dict[str, Any], cfg: TrainConfig) -> Layout:
    resolved = doc.get("resolved_config") or {}
    parallel, data, run = resolved.get("parallel", {}), resolved.get("data", {}), resolved.get("run", {})
    tp = int(parallel.get("tensor_model_parallel_size", 1))
    pp = int(parallel.get("pipeline_model_parallel_size", 1))
    world = int(doc.get("world_size") or tp * pp)
    dp = max(1, world // (tp * pp))
    mbs = int(data.get("micro_batch_size", 1))
    gbs = int(run.get("global_batch_size", mbs * dp))
    return Layout(
        tp=tp,
        pp=pp,
        dp=dp,
        micro_batch_size=mbs,
        num_microbatches=max(1, gbs // (mbs * dp)),
        recompute_granularity=parallel.get("recompute_granularity"),
        recompute_method=parallel.get("recompute_method", "uniform"),
        recompute_num_layers=int(parallel.get("recompute_num_layers", 1)),
        recompute_vision=bool(parallel.get("recompute_vision", False)),
        distributed_optimizer=bool(parallel.get("use_distributed_optimizer", True)),
        sequence_parallel=bool(parallel.get("sequence_parallel", False)),
    )


def measured_throughput(path: str, cfg: TrainConfig, data: DataAssumption, gpu: Gpu, peak: float) -> Throughput:
    """The utilization a `sail-bench --json` report measured, carried over: its MFU (model FLOPs, ViT
    counted) turned into the utilization of executed FLOPs by the same recompute and pipeline model the
    planner applies to every layout, so the measured layout gets back the measured MFU."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError("--measured", f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise PlanError("--measured", f"{path} is not a `sail-bench --json` report (no 'results')")
    measured = [(name, r) for name, r in doc["results"].items() if isinstance(r, dict) and r.get("mfu")]
    if not measured:
        raise PlanError(
            "--measured",
            f"{path} has no measured MFU (a CPU run, or a GPU without a known peak: measure with --peak-tflops)",
        )
    name, result = measured[0]
    layout = _layout_of_report(doc, cfg)
    flops = row_flops(cfg, data, layout.tp)
    stages, model = stage_flops(cfg, flops, layout)
    # Per GPU, MFU = m x model / ((m + pp - 1) x slowest stage x pp) x utilization (tokens_per_s_per_gpu).
    slots = layout.num_microbatches + layout.pp - 1
    utilization = float(result["mfu"]) * slots * max(stages) * layout.pp / (layout.num_microbatches * model)
    utilization = min(utilization, 1.0)
    note = (
        f"{100 * result['mfu']:.1f}% MFU measured ({path}, variant {name!r}, {doc.get('device', '?')}, "
        f"TP={layout.tp} PP={layout.pp})"
    )
    if doc.get("device") and gpu.name.split()[0].lower() not in str(doc["device"]).lower():
        note += f"; measured on another GPU than the {gpu.name} planned for"
    preset = (doc.get("resolved_config") or {}).get("model_preset")
    if preset and preset != cfg.model_preset:
        note += f"; measured on {preset}, planned for {cfg.model_preset}"
    return Throughput(
        utilization,
        peak,
        note + f": {100 * utilization:.1f}% of the peak on executed FLOPs",
        measured={
            "path": path,
            "variant": name,
            "device": doc.get("device"),
            "mfu": result["mfu"],
            "tokens_per_s_per_device": result.get("tokens_per_s_per_device"),
        },
    )


# --- the plan ------------------------------------------------------------------------------------------------


@dataclass
class Planned:
    layout: Layout
    memory: Memory
    fits: bool
    tokens_per_s_per_gpu: float
    mfu: float
    gpu_hours: float
    days: float
    picked: bool = False

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self.layout)
        d.update(
            memory_gib_per_gpu=self.memory.total / GIB,
            memory_split_gib=self.memory.split_gib(),
            memory_stage=self.memory.stage,
            fits=self.fits,
            tokens_per_s_per_gpu=self.tokens_per_s_per_gpu,
            mfu=self.mfu,
            gpu_hours=self.gpu_hours,
            days=self.days,
            picked=self.picked,
        )
        return d


def _order(p: Planned):
    return (not p.fits, -p.tokens_per_s_per_gpu, p.layout.model_parallel, p.memory.total)


def pick(planned: List[Planned]) -> Tuple[Optional[Planned], str]:
    fitting = [p for p in planned if p.fits]
    if not fitting:
        least = min(planned, key=lambda p: p.memory.total)
        return None, f"no layout fits; the smallest needs {least.memory.total / GIB:.1f} GiB per GPU"
    fastest = max(p.tokens_per_s_per_gpu for p in fitting)
    ties = [p for p in fitting if p.tokens_per_s_per_gpu >= (1 - TIE) * fastest]
    chosen = min(ties, key=lambda p: (p.layout.model_parallel, p.memory.total, -p.tokens_per_s_per_gpu))
    chosen.picked = True
    why = f"the fastest of the {len(fitting)} layouts that fit"
    if len(ties) > 1:
        why += (
            f"; {len(ties)} are within {100 * TIE:.1f}% of it: fewest model-parallel ranks (TP x PP = "
            f"{chosen.layout.model_parallel}), then least memory"
        )
    return chosen, why


def plan(
    cfg: TrainConfig,
    gpus: int,
    gpu: str = "h100",
    mfu: Optional[float] = None,
    measured: Optional[str] = None,
    tokens_per_sample: Optional[float] = None,
    headroom: float = DEFAULT_HEADROOM,
    config_path: str = "",
) -> Dict[str, Any]:
    """The whole plan as a JSON-able document (what --json prints)."""
    if gpus < 1:
        raise PlanError("--gpus", f"must be a positive number of GPUs, got {gpus}")
    if gpu not in GPUS:
        raise PlanError("--gpu", f"unknown GPU {gpu!r}; use one of {', '.join(GPUS)}")
    if mfu is not None and not 0 < mfu <= 1:
        raise PlanError("--mfu", f"must be in (0, 1], got {mfu}")
    if tokens_per_sample is not None and not tokens_per_sample > 0:
        raise PlanError("--tokens-per-sample", f"must be > 0, got {tokens_per_sample}")
    if not 0 <= headroom < 1:
        raise PlanError("--headroom", f"must be in [0, 1), got {headroom}")
    cfg.model.validate()
    cfg.freeze.validate()
    spec = GPUS[gpu]
    peak = peak_flops(spec.device_name, "bf16")
    data = data_assumption(cfg)
    budget = budget_tokens(cfg, data, tokens_per_sample)
    layouts, refused = candidate_layouts(cfg, gpus)
    if not layouts:
        shown = "; ".join(refused[:2]) + (f"; and {len(refused) - 2} more reasons" if len(refused) > 2 else "")
        raise PlanError("--gpus", f"no layout of this recipe runs on {gpus} GPUs: {shown}")
    if measured is not None:
        speed = measured_throughput(measured, cfg, data, spec, peak)
    else:
        u = DEFAULT_MFU if mfu is None else mfu
        speed = Throughput(
            u,
            peak,
            f"{100 * u:.0f}% of the {spec.name}'s bf16 peak ({peak / 1e12:.0f} TFLOP/s) on the FLOPs a layout "
            "executes (padding and recomputation included)"
            + (" (--mfu)" if mfu is not None else " (the default; --mfu or --measured to change it)"),
        )
    usable = (1 - headroom) * spec.memory_bytes
    memory = MemoryModel(cfg, data)
    flops_by_tp: Dict[int, RowFlops] = {}
    planned = []
    for layout in layouts:
        if layout.tp not in flops_by_tp:
            flops_by_tp[layout.tp] = row_flops(cfg, data, layout.tp)
        flops = flops_by_tp[layout.tp]
        rate, effective = tokens_per_s_per_gpu(cfg, data, flops, layout, gpus, speed)
        hours = budget.tokens / rate / 3600
        m = memory.of(layout)
        planned.append(Planned(layout, m, m.total <= usable, rate, effective, hours, hours / gpus / 24))
    chosen, why = pick(planned)
    planned.sort(key=_order)
    counts = count_parameters(cfg.model)
    reference = flops_by_tp.get(1) or next(iter(flops_by_tp.values()))
    per_token = reference.model.total / data.mean_tokens_per_row
    return {
        "config": config_path,
        "model_preset": cfg.model_preset,
        "gpus": gpus,
        "gpu": spec.name,
        "gpu_memory_gib": spec.memory_bytes / GIB,
        "headroom": headroom,
        "usable_memory_gib": usable / GIB,
        "precision": cfg.precision.dtype,
        "trainable": list(cfg.freeze.trainable),
        "params_total": counts.total_built,
        "params_by_part": {"vision": counts.vision_built, "projector": counts.projector, "language": counts.language},
        "budget_tokens": budget.tokens,
        "budget": budget.description,
        "data": {k: v for k, v in dataclasses.asdict(data).items() if k != "rows"} | {"description": data.describe()},
        "training_flops_per_token": per_token,
        "vit_flops_share": reference.model.vision / reference.model.total,
        "throughput": {"utilization": speed.utilization, "description": speed.description, "measured": speed.measured},
        "picked": chosen.as_dict() if chosen else None,
        "why": why,
        "layouts": [p.as_dict() for p in planned],
        "left_out": refused,
        "notes": NOTES,
    }


NOTES = [
    "weights, gradients and optimizer state are exact for megatron-core 0.16 (tested against built models); "
    "activations are an estimate for the worst micro-batch (its tokens and data.max_tiles_per_pack tiles)",
    "throughput: one utilization for every layout; recomputation adds executed FLOPs, pipelines wait for their "
    "slowest stage (the first holds the ViT) and fill and drain once per step; communication is not modelled",
    "loader: the micro-batch on the device (tokens and decoded fp32 tiles); rows waiting their turn are in "
    "pinned host memory, and DALI's own GPU buffers are left to the headroom",
]


# --- output --------------------------------------------------------------------------------------------------


def _fmt_hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 else f"{h:.1f}"


def render(doc: Dict[str, Any], show_all: bool = False) -> str:
    parts = doc["params_by_part"]
    lines = [
        f"sail-bench plan: {doc['config']} on {doc['gpus']} x {doc['gpu']} "
        f"({doc['gpu_memory_gib']:.1f} GiB; {100 * doc['headroom']:.0f}% kept free for fragmentation, NCCL and the "
        f"CUDA context: {doc['usable_memory_gib']:.1f} GiB usable)",
        f"model: {doc['model_preset']}, {format_count(doc['params_total'])} parameters built "
        f"(vision {format_count(parts['vision'])}, projector {format_count(parts['projector'])}, "
        f"language {format_count(parts['language'])}); trains {'+'.join(doc['trainable'])}; "
        f"{doc['precision']}",
        f"budget: {doc['budget']}"
        + ("" if "(run.train_tokens)" in doc["budget"] else f" = {format_count(doc['budget_tokens'])} tokens"),
        f"data (assumed): {doc['data']['description']}",
        f"FLOPs: {doc['training_flops_per_token'] / 1e9:.3g} GFLOP per token to train, ViT counted "
        f"({100 * doc['vit_flops_share']:.0f}% of it)",
        f"throughput: {doc['throughput']['description']}",
        "",
    ]
    header = (
        f"  {'TP':>2} {'PP':>2} {'DP':>5} {'mbs':>3} {'recompute':<15}{'dist-opt':<9}"
        f"{'weights':>8}{'grads':>7}{'optim':>7}{'activ':>7}{'loader':>7}{'total':>7} {'fits':<5}"
        f"{'tok/s/GPU':>10}{'MFU':>6}{'GPU-hours':>11}{'days':>7}"
    )
    lines += [header + "   (memory in GiB per GPU)", "-" * len(header)]
    layouts = doc["layouts"]
    shown = layouts if show_all else layouts[:TABLE_ROWS]
    if not show_all and doc["picked"] is not None and doc["picked"] not in shown:
        shown = shown + [doc["picked"]]
    for r in shown:
        s = r["memory_split_gib"]
        recompute = (r["recompute_granularity"] or "none") + ("+vit" if r["recompute_vision"] else "")
        lines.append(
            f"{'*' if r['picked'] else ' '} {r['tp']:>2} {r['pp']:>2} {r['dp']:>5} {r['micro_batch_size']:>3} "
            f"{recompute:<15}{'on' if r['distributed_optimizer'] else 'off':<9}"
            f"{s['weights']:>8.1f}{s['grads']:>7.1f}{s['optimizer']:>7.1f}{s['activations']:>7.1f}{s['loader']:>7.2f}"
            f"{r['memory_gib_per_gpu']:>7.1f} {'yes' if r['fits'] else 'no':<5}"
            f"{r['tokens_per_s_per_gpu']:>10,.0f}{100 * r['mfu']:>5.1f}%{_fmt_hours(r['gpu_hours']):>11}"
            f"{r['days']:>7.1f}"
        )
    hidden = len(layouts) - len(shown)
    if hidden > 0:
        unfit = sum(not r["fits"] for r in layouts if r not in shown)
        lines.append(f"  ... {hidden} more layouts ({unfit} of them do not fit): --all lists them")
    lines.append("")
    p = doc["picked"]
    if p is None:
        lines.append(f"picked: none: {doc['why']}")
    else:
        lines.append(
            f"picked (*): TP={p['tp']} PP={p['pp']} DP={p['dp']}, micro-batch {p['micro_batch_size']}, recompute "
            f"{(p['recompute_granularity'] or 'none') + (' + ViT' if p['recompute_vision'] else '')}, distributed "
            f"optimizer {'on' if p['distributed_optimizer'] else 'off'}: {doc['why']}. "
            f"{p['memory_gib_per_gpu']:.1f} GiB per GPU, {p['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, "
            f"{_fmt_hours(p['gpu_hours'])} GPU-hours, {p['days']:.1f} days on {doc['gpus']} GPUs."
        )
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        prog="sail-bench plan",
        description="Memory, throughput and time of a recipe's stage on N GPUs, for every layout it allows "
        "(pure arithmetic from the recipe: no GPU, nothing built).",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="the stage's recipe (YAML)")
    p.add_argument("--gpus", required=True, type=int, help="GPUs in the job")
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--mfu", type=float, default=None, help=f"assumed utilization, (0, 1] (default {DEFAULT_MFU})")
    speed.add_argument("--measured", default=None, help="a `sail-bench --json` report whose MFU to carry over")
    p.add_argument(
        "--tokens-per-sample",
        type=float,
        default=None,
        help="mean tokens per sample of the real data (converts a samples budget; default: the synthetic mean)",
    )
    p.add_argument(
        "--headroom", type=float, default=DEFAULT_HEADROOM, help="share of GPU memory kept free (default 0.1)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--all", action="store_true", help="list every layout, not the first dozen")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, as for sail-train")
    args = p.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        doc = plan(
            cfg,
            args.gpus,
            gpu=args.gpu.lower(),
            mfu=args.mfu,
            measured=args.measured,
            tokens_per_sample=args.tokens_per_sample,
            headroom=args.headroom,
            config_path=args.config,
        )
    except PlanError as e:
        p.error(str(e))
    except ConfigError as e:
        print(f"sail-bench plan: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(doc, indent=2) if args.json else render(doc, show_all=args.all), flush=True)
