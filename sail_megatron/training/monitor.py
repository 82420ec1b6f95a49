"""What a run reports: one console line every `log_interval` steps (with ETA), TensorBoard scalars and
`metrics.jsonl` (the curve PNG is drawn from it) on the main rank.

Per-step figures accumulate locally; they are reduced over data-parallel ranks once per log interval,
so logging costs one small collective per interval, not per step.
"""

import json
import logging
import resource
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from sail_megatron.config.counts import format_count
from sail_megatron.platform import read_dist_env
from sail_megatron.training.collectives import (
    max_over_world,
    sum_counts_over_data_parallel,
    sum_over_data_parallel,
    sum_over_world,
)
from sail_megatron.training.flops import PeakFlops, mfu_figures, peak_flops
from sail_megatron.training.metered_data import DataTally
from sail_megatron.training.moe_metrics import MoeRouting
from sail_megatron.training.progress import Progress
from sail_megatron.training.run_logs import METRICS_FILE, TENSORBOARD_DIR

logger = logging.getLogger(__name__)


def peak_memory_gib() -> float:
    """Peak accelerator memory allocated by torch on GPU; peak resident memory of the process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_peak_flops(precision, override_tflops: Optional[float] = None) -> PeakFlops:
    """This device's 16-bit peak and, for FP8 runs, its FP8 peak (MFU is reported against both). None
    where MFU is not quoted: CPU, fp32, unknown GPUs (TFLOP/s still is). `override_tflops` is the 16-bit
    peak; the FP8 one is then unknown."""
    if override_tflops:
        return PeakFlops(bf16=override_tflops * 1e12)
    if not torch.cuda.is_available() or precision.dtype not in ("bf16", "fp16"):
        return PeakFlops()
    name = torch.cuda.get_device_name()
    return PeakFlops(bf16=peak_flops(name, precision.dtype), fp8=peak_flops(name, "fp8") if precision.fp8 else None)


def _loss_scale_text(r: Dict) -> str:
    """fp16 only: the loss scale and how many steps overflowed so far."""
    if r["loss_scale"] is None:
        return ""
    return f" | loss scale {r['loss_scale']:g} (overflows {r['overflow_steps']})"


def _moe_text(r: Dict) -> str:
    """Mixture-of-experts routing: the load-balancing loss, the worst layer's max/mean expert load and the
    router's entropy."""
    if "moe_router_entropy" not in r:
        return ""
    aux = f" aux {r['moe_aux_loss']:.3g}" if r.get("moe_aux_loss") is not None else ""
    return (
        f" | moe{aux} load max/mean {r['moe_load_max_over_mean_worst']:.2f} "
        f"router entropy {r['moe_router_entropy']:.3f}"
    )


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _mfu_text(mfu: Optional[float], mfu_fp8: Optional[float]) -> str:
    """' | MFU 41.2%'; FP8 runs: ' | MFU 41.2% bf16 / 20.6% FP8' (against each peak)."""
    if mfu_fp8 is None:
        return f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
    bf16 = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    return f" | MFU {bf16} bf16 / {100 * mfu_fp8:.1f}% FP8"


@dataclass
class _Interval:
    steps: int = 0
    time_s: float = 0.0
    losses: List[float] = field(default_factory=list)
    data: DataTally = field(default_factory=DataTally)


class TrainingMonitor:
    """Collective `end_step` on every rank; prints and writes only on the main rank."""

    def __init__(
        self,
        run_dir: Path,
        progress: Progress,
        log_interval: int,
        peak_flops: Union[PeakFlops, float, None],
        tensorboard: bool = True,
        pipeline_stages: int = 1,
        moe: Optional[MoeRouting] = None,
    ):
        """moe: the routing statistics of a mixture-of-experts language model (training/moe_metrics.py)."""
        """peak_flops: device_peak_flops(...); a bare number is taken as the 16-bit peak."""
        self.env = read_dist_env()
        self.run_dir, self.progress, self.log_interval = Path(run_dir), progress, log_interval
        self.pipeline_stages = pipeline_stages
        self.moe = moe
        self.peaks = peak_flops if isinstance(peak_flops, PeakFlops) else PeakFlops(bf16=peak_flops)
        start_step = progress.consumed.steps
        self.interval = _Interval()
        self.step_times: List[float] = []
        self.step_units: List[int] = []
        """What each step consumed in the budget's unit (for the ETA)."""
        self.nonfinite_steps = 0
        self.overflow_steps = 0
        """fp16 loss-scaler overflows (updates skipped while the scale backs off)."""
        self.loss_scale = None
        self.writer = None
        if self.env.is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=start_step + 1)
        self._jsonl = open(self.run_dir / METRICS_FILE, "a") if self.env.is_main else None

    def end_step(
        self, step: int, result, step_time_s: float, tally: DataTally, lrs: Dict[str, float], skipped_samples: Counter
    ) -> None:
        """Account one finished step (1-based `step`); logs when the interval is complete."""
        iv = self.interval
        iv.steps += 1
        iv.time_s += step_time_s
        if not result.skipped:
            iv.losses.append(result.loss)
        else:
            self.nonfinite_steps += 1
        self.overflow_steps += bool(getattr(result, "overflow", False))
        self.loss_scale = getattr(result, "loss_scale", None)
        for name in (
            "wait_s",
            "micro_batches",
            "samples",
            "tokens",
            "slots",
            "tiles",
            "images",
            "decoded_images",
            "decoded_tiles",
            "vit_tiles",
            "flops",
        ):
            setattr(iv.data, name, getattr(iv.data, name) + getattr(tally, name))
        self.step_times.append(step_time_s)
        self.step_units.append(self.progress.last_step.of(self.progress.budget.unit))
        if step % self.log_interval == 0 or self.progress.done:
            self._log(step, result, lrs, skipped_samples)
            self.interval = _Interval()

    def _reduce(self, iv: _Interval) -> Dict[str, float]:
        d = iv.data
        samples, tokens, slots, tiles, images, flops = sum_over_data_parallel(
            [d.samples, d.tokens, d.slots, d.tiles, d.images, d.flops]
        )
        wait_s, mem, dec_images_max, dec_tiles_max = max_over_world(
            [d.wait_s, peak_memory_gib(), d.decoded_images, d.decoded_tiles]
        )
        dec_images, dec_tiles, vit_tiles = sum_over_world([d.decoded_images, d.decoded_tiles, d.vit_tiles])
        return dict(
            samples=samples,
            tokens=tokens,
            slots=slots,
            tiles=tiles,
            images=images,
            flops=flops,
            wait_s=wait_s,
            mem=mem,
            dec_images=dec_images,
            dec_tiles=dec_tiles,
            vit_tiles=vit_tiles,
            dec_images_max=dec_images_max,
            dec_tiles_max=dec_tiles_max,
        )

    def _vision_work(self, r: Dict[str, float], steps: int) -> Dict[str, Optional[float]]:
        """Per step: the images of the whole job, and what each rank holding the vision encoder decoded
        and encoded (max and mean over those ranks); decode_copies: how many ranks decoded each image
        (1 under parallel.vision_parallel=data, the tensor-parallel size otherwise)."""
        vision_ranks = self.env.world_size // self.pipeline_stages
        return {
            "images_per_step": r["images"] / steps,
            "decoded_images_per_rank_max": r["dec_images_max"] / steps,
            "decoded_images_per_rank_mean": r["dec_images"] / vision_ranks / steps,
            "decoded_tiles_per_rank_max": r["dec_tiles_max"] / steps,
            "decoded_tiles_per_rank_mean": r["dec_tiles"] / vision_ranks / steps,
            "decode_copies": r["dec_images"] / r["images"] if r["images"] else None,
            # What the ViT ran beyond the decoded tiles: blank tiles of text-only micro-batches, and the
            # padding up to precision.vision_tile_buckets (work MFU does not count).
            "vit_tiles_per_rank_mean": r["vit_tiles"] / vision_ranks / steps,
            "vit_padding_fraction": 1 - r["dec_tiles"] / r["vit_tiles"] if r["vit_tiles"] else None,
        }

    def _log(self, step: int, result, lrs: Dict[str, float], skipped_samples: Counter) -> None:
        iv = self.interval
        r = self._reduce(iv)
        # Each data-parallel rank's loader reads (and skips) its own slice of the data.
        skipped_samples = sum_counts_over_data_parallel(skipped_samples)
        moe = self.moe.collect() if self.moe is not None else {}  # collective: every rank, every log
        if not self.env.is_main:
            return
        t = max(iv.time_s, 1e-9)
        # ETA from the recent steps' pace; the first step after (re)start compiles and warms caches.
        first = 1 if len(self.step_times) > 1 else 0
        times, units = self.step_times[first:][-50:], self.step_units[first:][-50:]
        eta = self.progress.remaining() * sum(times) / max(sum(units), 1)
        consumed = self.progress.consumed
        flops_per_device = r["flops"] / t / self.env.world_size
        record = {
            "step": step,
            "consumed_tokens": consumed.tokens,
            "consumed_samples": consumed.samples,
            "budget_fraction": self.progress.fraction,
            "loss": (sum(iv.losses) / len(iv.losses)) if iv.losses else float("nan"),
            "grad_norm": result.grad_norm,
            "lr": lrs.get("language", next(iter(lrs.values()))),
            **{f"lr_{part}": lr for part, lr in lrs.items()},
            "step_time_s": t / iv.steps,
            "tokens_per_s": r["tokens"] / t,
            "tokens_per_s_per_device": r["tokens"] / t / self.env.world_size,
            "samples_per_s": r["samples"] / t,
            "tiles_per_s": r["tiles"] / t,
            "tflops_per_s": flops_per_device / 1e12,
            **mfu_figures(flops_per_device, self.peaks),
            "packing_utilization": r["tokens"] / r["slots"] if r["slots"] else None,
            **self._vision_work(r, iv.steps),
            "data_wait_frac": r["wait_s"] / t,
            "memory_gib": r["mem"],
            "nonfinite_steps": self.nonfinite_steps,
            "overflow_steps": self.overflow_steps,
            "loss_scale": self.loss_scale,
            "skipped_samples": sum(skipped_samples.values()),
            "eta_s": eta,
            **moe,
        }
        self._console(record, skipped_samples)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self.writer is not None:
            self._tensorboard(record)

    def _console(self, r: Dict, skipped: Counter) -> None:
        mfu = _mfu_text(r["mfu"], r["mfu_fp8"])
        skipped_text = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "0"
        print(
            f"{self._progress_text(r)} | loss {r['loss']:.4f} | grad norm {r['grad_norm']:.3f} "
            f"| lr {r['lr']:.2e} | {1000 * r['step_time_s']:.0f} ms/step | {r['tokens_per_s']:,.0f} tok/s "
            f"| {r['tflops_per_s']:.3g} TFLOP/s/dev{mfu} | pack {100 * (r['packing_utilization'] or 0):.0f}% "
            f"| data wait {100 * r['data_wait_frac']:.0f}% | mem {r['memory_gib']:.2f} GiB "
            f"| nonfinite {r['nonfinite_steps']}{_loss_scale_text(r)}{_moe_text(r)} | skipped samples {skipped_text} "
            f"| ETA {_format_eta(r['eta_s'])}",
            flush=True,
        )

    def _progress_text(self, r: Dict) -> str:
        """'step 5/20 | 12.3K tok, 40 samples' (a steps budget) or 'step 5 | 12.3K/20K tok (61%), 40
        samples' (a tokens budget; samples alike)."""
        budget = self.progress.budget
        tokens, samples = format_count(r["consumed_tokens"]), f"{r['consumed_samples']:,}"
        pct = f" ({100 * r['budget_fraction']:.0f}%)"
        if budget.unit == "tokens":
            tokens += f"/{format_count(budget.amount)}{pct}"
        elif budget.unit == "samples":
            samples += f"/{budget.amount:,}{pct}"
        step = f"step {r['step']:6d}" + (f"/{budget.amount}" if budget.unit == "steps" else "")
        return f"{step} | {tokens} tok, {samples} samples"

    def _tensorboard(self, r: Dict) -> None:
        step = r["step"]
        scalars = {
            "loss/train": r["loss"],
            "progress/consumed_tokens": r["consumed_tokens"],
            "progress/consumed_samples": r["consumed_samples"],
            "progress/budget_fraction": r["budget_fraction"],
            "optim/grad_norm": r["grad_norm"],
            "throughput/tokens_per_s": r["tokens_per_s"],
            "throughput/tokens_per_s_per_device": r["tokens_per_s_per_device"],
            "throughput/samples_per_s": r["samples_per_s"],
            "throughput/tflops_per_s_per_device": r["tflops_per_s"],
            "throughput/step_time_s": r["step_time_s"],
            "data/packing_utilization": r["packing_utilization"],
            "vision/decoded_images_per_rank_max": r["decoded_images_per_rank_max"],
            "vision/decoded_images_per_rank_mean": r["decoded_images_per_rank_mean"],
            "vision/decoded_tiles_per_rank_max": r["decoded_tiles_per_rank_max"],
            "vision/decoded_tiles_per_rank_mean": r["decoded_tiles_per_rank_mean"],
            "vision/vit_padding_fraction": r["vit_padding_fraction"],
            "vision/decode_copies": r["decode_copies"],
            "data/wait_fraction": r["data_wait_frac"],
            "data/skipped_samples": r["skipped_samples"],
            "faults/nonfinite_steps": r["nonfinite_steps"],
            "memory/peak_gib": r["memory_gib"],
            "faults/overflow_steps": r["overflow_steps"],
            "optim/loss_scale": r["loss_scale"],
        }
        scalars["throughput/mfu"], scalars["throughput/mfu_fp8"] = r["mfu"], r["mfu_fp8"]  # None: not written
        for key in ("moe_aux_loss", "moe_router_entropy", "moe_load_max_over_mean_worst", "moe_dead_experts"):
            if key in r:
                scalars[f"moe/{key[4:]}"] = r[key]
        for i, value in enumerate(r.get("moe_load_max_over_mean") or []):
            scalars[f"moe/load_max_over_mean/layer_{i}"] = value
        for key, value in r.items():
            if key.startswith("lr_"):
                scalars[f"optim/{key}"] = value
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_validation(self, step: int, result) -> None:
        """One validation result (a ValidResult, the same on every rank): console, metrics.jsonl, TensorBoard.
        The total under `valid_loss` / `loss/valid`, each source's loss under `valid_loss/<source>` /
        `loss/valid/<source>` (and its trained tokens under `valid_tokens/<source>`)."""
        if not self.env.is_main:
            return
        sources = getattr(result, "sources", None) or {}
        print(
            f"validation at step {step:6d} | loss {result.loss:.4f} | {result.trained_tokens:,} tokens "
            f"| {result.seconds:.1f} s",
            flush=True,
        )
        if len(sources) > 1:  # with one source the total is its loss
            width = max(len(name) for name in sources)
            for name, s in sources.items():
                loss = f"{s.loss:.4f}" if s.loss is not None else "n/a"
                print(f"    {name:<{width}} | loss {loss} | {s.trained_tokens:,} tokens", flush=True)
        consumed = self.progress.consumed
        record = {
            "step": step,
            "consumed_tokens": consumed.tokens,
            "consumed_samples": consumed.samples,
            "valid_loss": result.loss,
            "valid_tokens": result.trained_tokens,
        }
        for name, s in sources.items():
            record[f"valid_loss/{name}"] = s.loss
            record[f"valid_tokens/{name}"] = s.trained_tokens
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self.writer is not None:
            self.writer.add_scalar("loss/valid", result.loss, step)
            for name, s in sources.items():
                if s.loss is not None:
                    self.writer.add_scalar(f"loss/valid/{name}", s.loss, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
