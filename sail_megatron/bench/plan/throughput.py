"""How fast a layout goes: the time of a training step (compute at an assumed or measured utilization, plus
the communication it cannot hide: bench/plan/communication.py) and the tokens/s per GPU that makes."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from sail_megatron.bench.plan.communication import CommunicationModel, StageCommunication, exposed_data_parallel_s
from sail_megatron.bench.plan.data import DataAssumption
from sail_megatron.bench.plan.errors import PlanError
from sail_megatron.bench.plan.flops import RowFlops, row_flops, stage_flops
from sail_megatron.bench.plan.gpus import Gpu
from sail_megatron.bench.plan.layouts import Layout
from sail_megatron.config.train import TrainConfig

DEFAULT_MFU = 0.40


@dataclass
class Throughput:
    """How fast the GPUs are assumed to work: `utilization` of the peak on the FLOPs they execute."""

    utilization: float
    peak: float
    description: str
    measured: Optional[Dict[str, Any]] = None


@dataclass(frozen=True)
class StepTime:
    """One training step of a layout, in seconds."""

    compute: float
    """The step without communication: num_microbatches + pp - 1 slots of the slowest stage's compute."""
    tensor_parallel: float
    """TP collectives of the stage that sets the pace, over the step's slots."""
    pipeline: float
    """Pipeline sends over the step's slots."""
    expert_parallel: float
    """Expert all-to-alls of the stage that sets the pace, over the step's slots."""
    data_parallel: float
    """Gradient reduction and parameter gather left exposed (the stage that exposes most)."""
    data_parallel_before_overlap: float
    total: float

    @property
    def comm_fraction(self) -> float:
        """Communication's share of the step: what the step takes beyond its compute."""
        return 1 - self.compute / self.total


def step_time(
    cfg: TrainConfig, flops: RowFlops, layout: Layout, speed: Throughput, comm: List[StageCommunication]
) -> Tuple[StepTime, float]:
    """(the step's time, its model FLOPs). A step runs num_microbatches + pp - 1 micro-batch slots of the
    slowest stage (1F1B: the pipeline fills and drains once per step), each slot that stage's compute plus
    its TP collectives and pipeline sends; the data-parallel time a stage cannot hide comes on top."""
    stages, model = stage_flops(cfg, flops, layout)
    rate = layout.tp * speed.peak * speed.utilization  # executed FLOP/s of one stage (its TP ranks)
    slots = layout.num_microbatches + layout.pp - 1
    slot = [w.total / rate + c.tensor_parallel_s + c.pipeline_s + c.expert_parallel_s for w, c in zip(stages, comm)]
    pace = max(range(layout.pp), key=lambda s: slot[s])
    p = cfg.parallel
    exposed = [
        exposed_data_parallel_s(
            c,
            w.forward_window / rate,
            w.backward_window / rate,
            p.overlap_grad_reduce,
            p.overlap_param_gather and layout.distributed_optimizer,
        )
        for w, c in zip(stages, comm)
    ]
    data_parallel = max(exposed)
    return (
        StepTime(
            compute=slots * max(w.total for w in stages) / rate,
            tensor_parallel=slots * comm[pace].tensor_parallel_s,
            pipeline=slots * comm[pace].pipeline_s,
            expert_parallel=slots * comm[pace].expert_parallel_s,
            data_parallel=data_parallel,
            data_parallel_before_overlap=max(c.gradient_s + c.parameter_s for c in comm),
            total=slots * slot[pace] + data_parallel,
        ),
        model,
    )


def tokens_per_s_per_gpu(
    cfg: TrainConfig,
    data: DataAssumption,
    flops: RowFlops,
    layout: Layout,
    speed: Throughput,
    comm: List[StageCommunication],
) -> Tuple[float, float, StepTime]:
    """(tokens/s per GPU, the model-FLOPs utilization that means, the step's time)."""
    step, model = step_time(cfg, flops, layout, speed, comm)
    rows = layout.num_microbatches * layout.micro_batch_size * layout.dp  # the global batch
    rate = rows * data.mean_tokens_per_row / step.total / (layout.tp * layout.pp * layout.dp)
    per_token = model / (layout.micro_batch_size * data.mean_tokens_per_row)
    return rate, rate * per_token / speed.peak, step


def _layout_of_report(doc: Dict[str, Any], cfg: TrainConfig) -> Layout:
    resolved = doc.get("resolved_config") or {}
    parallel, data, run = resolved.get("parallel", {}), resolved.get("data", {}), resolved.get("run", {})
    tp = int(parallel.get("tensor_model_parallel_size", 1))
    pp = int(parallel.get("pipeline_model_parallel_size", 1))
    ep = int(parallel.get("expert_model_parallel_size", 1))
    etp = parallel.get("expert_tensor_parallel_size")
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
        ep=ep,
        etp=tp if etp is None else int(etp),
        vision_parallel=parallel.get("vision_parallel", "tensor"),
    )


def measured_throughput(
    path: str, cfg: TrainConfig, data: DataAssumption, gpu: Gpu, peak: float, communication: CommunicationModel
) -> Throughput:
    """The utilization a `sail-bench --json` report measured, carried over: its MFU (model FLOPs, ViT
    counted) turned into the utilization of executed FLOPs by the same recompute, pipeline and
    communication model the planner applies to every layout, so the measured layout (on the report's
    number of GPUs) gets back the measured MFU."""
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
    comm = communication.of(layout)
    target = float(result["mfu"])

    def mfu(utilization: float) -> float:
        return tokens_per_s_per_gpu(cfg, data, flops, layout, Throughput(utilization, peak, ""), comm)[1]

    # The MFU grows with the utilization: bisect for the one that gives the measured layout its MFU back.
    low, high = 0.0, 1.0
    capped = mfu(high) <= target
    while not capped and high - low > 1e-9:
        middle = (low + high) / 2
        low, high = (middle, high) if mfu(middle) < target else (low, middle)
    utilization = high
    note = (
        f"{100 * result['mfu']:.1f}% MFU measured ({path}, variant {name!r}, {doc.get('device', '?')}, "
        f"TP={layout.tp} PP={layout.pp} DP={layout.dp})"
    )
    if capped:
        note += "; more than the communication model allows at the full peak, so planned at the peak"
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
