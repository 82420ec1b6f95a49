"""`make gpu-check`: one pass over everything in this project that only a GPU can run, in about 6-8 minutes
on one H100/H200, ending in one report (`gpu_check/report.md` and `gpu_check/report.json`).

Each part runs in its own subprocess under a timeout, and the whole check has one time budget; a part that
fails, crashes or runs out of time is recorded (status, figures so far, the tail of its log) and the next one
starts.
The parts, in order (docs/gpu.md says why each is GPU-only):

  pytest-gpu      `pytest tests/gpu`: bf16 and FP8 training steps of the tiny model on NCCL + CUDA (+ TE)
  layers          Transformer Engine vs megatron-core local layers on the same weights: logits of the tiny
                  model and of a small sail-vl-2b-shaped model, on a padded batch and on a packed (THD) row
  train-bf16      `sail-bench` on the sail-vl-2b SFT recipe, bf16: tokens/s, TFLOP/s, MFU with the ViT counted
  train-fp8       the same with precision.fp8=hybrid
  kernels-bench   the benchmarks/kernels scripts: compiled Triton vs PyTorch reference, GB/s against the
                  device's memory bandwidth
  decode          DALI (device 'mixed': nvJPEG + GPU resize) vs the PIL path, images/s and tiles/s
  checkpoint      a checkpoint written with local layers on the CPU (CUDA hidden) loads into TE layers on
                  the GPU, through the same code as `run.init_from`, and gives the CPU's logits
  kernel-tests    `pytest tests/kernels`: on CUDA these run the compiled kernels against their references

Without CUDA, `main` says so and returns 2 before running anything.

Workers (the code that runs inside a part's subprocess) live here too: `python -m sail_megatron.bench.gpu_check
worker NAME OUT.json` (used by the parts; not meant to be called by hand).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

TE_REQUIREMENT = "transformer-engine[pytorch]>=2.9,<2.12"  # what megatron-core 0.16 supports
TE_MISSING = (
    "Transformer Engine is not importable ({error}); `make gpu-check INSTALL_TE=1` installs it "
    f"(pip install --no-build-isolation '{TE_REQUIREMENT}')"
)
DEFAULT_BUDGET_S = 450  # the whole check, from the start (probe, parts); the last part may be cut short
MIN_START_S = 30  # a part is not started with less budget than this left
LOG_TAIL_LINES = 40
STATUSES = ("passed", "failed", "timeout", "skipped")

# Memory bandwidth per device from NVIDIA's datasheets, TB/s, matched as substrings of the device name, first
# match first (specific names before "H100"; "GH200" before "H200").
MEMORY_BANDWIDTH_TBPS = (
    ("H100 PCIe", 2.0),
    ("H100 NVL", 3.9),
    ("H100", 3.35),  # SXM, HBM3
    ("GH200", 4.0),
    ("H200", 4.8),
    ("B200", 8.0),
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),
)

# Logit agreement: bf16 against bf16 computed another way (other GEMMs, fused norms, flash attention) stays
# near 1e-2 relative L2; a weight loaded into the wrong place gives ~1. Top-1 agreement is reported, not
# judged: randomly initialised models have near-uniform logits, so ties flip on rounding alone.
MAX_REL_L2 = 0.05
# DALI on nvJPEG vs Pillow/libjpeg, in uint8 levels after normalization: IDCT, chroma upsampling and cubic
# kernels differ a little (the CPU backend measures 0.16 levels mean); a wrong picture is tens of levels off.
MAX_DECODE_MEAN_LEVELS = 2.0


# ------------------------------------------------------------------------------------------------------------
# Parts and their results
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    root: Path
    """The repository: commands run here."""
    out: Path
    """Where the report goes; logs/ and work/ below it."""
    python: str = sys.executable
    env: Dict[str, Any] = field(default_factory=dict)
    """What the environment probe found (versions, device, bandwidth)."""
    tokenizer: Optional[Path] = None

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def work(self) -> Path:
        return self.out / "work"

    def figures_path(self, name: str) -> Path:
        return self.work / f"{name}.json"


@dataclass
class Part:
    name: str
    title: str
    timeout_s: float
    command: Callable[[Context], List[str]]
    collect: Optional[Callable[[Context, str], Tuple[Dict[str, Any], str]]] = None
    """(figures, one-line summary) from the part's outputs and log text; runs whatever the status."""
    needs_te: bool = False
    extra_env: Dict[str, str] = field(default_factory=dict)


@dataclass
class PartResult:
    name: str
    title: str
    status: str
    """passed | failed | timeout | skipped"""
    seconds: float = 0.0
    command: str = ""
    returncode: Optional[int] = None
    summary: str = ""
    reason: str = ""
    """Why it was skipped, or what failed when the log alone does not say."""
    figures: Dict[str, Any] = field(default_factory=dict)
    log: str = ""
    log_tail: str = ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_part(part: Part, ctx: Context, timeout_s: float) -> PartResult:
    """One part in its own process group; killed with the group at the timeout."""
    ctx.logs.mkdir(parents=True, exist_ok=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    log_path = ctx.logs / f"{part.name}.log"
    try:
        argv = part.command(ctx)
    except Exception as e:  # a part that cannot even say what to run (missing input)
        return PartResult(part.name, part.title, "failed", reason=f"{type(e).__name__}: {e}")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        **part.extra_env,
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # a worker is a world of its own
        env.pop(var, None)
    result = PartResult(part.name, part.title, "failed", command=" ".join(argv), log=str(log_path))
    began = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {result.command}\n")
        log.flush()
        proc = subprocess.Popen(
            argv, cwd=ctx.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            result.returncode = proc.wait(timeout=timeout_s)
            result.status = "passed" if result.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group: its workers go with it
            proc.wait()
            result.status = "timeout"
            result.reason = f"killed after {timeout_s:.0f} s"
    result.seconds = time.monotonic() - began
    text = log_path.read_text(errors="replace")
    result.log_tail = _tail(text)
    if part.collect is not None:
        try:
            result.figures, result.summary = part.collect(ctx, text)
        except Exception as e:
            if result.status == "passed":
                result.status = "failed"
            result.reason = result.reason or f"could not read the part's results: {type(e).__name__}: {e}"
    return result


def run_parts(
    parts: Sequence[Part], ctx: Context, budget_s: float, on_done: Optional[Callable[[PartResult], None]] = None
) -> List[PartResult]:
    """Every part in order, whatever happened to the previous ones, within one time budget."""
    deadline = time.monotonic() + budget_s
    te_ok = bool(ctx.env.get("transformer_engine"))
    results = []
    for part in parts:
        left = deadline - time.monotonic()
        if part.needs_te and not te_ok:
            result = PartResult(
                part.name,
                part.title,
                "skipped",
                reason=TE_MISSING.format(
                    error=ctx.env.get(
                        "transformer_engine_error",
                        "the environment probe failed" if "probe_error" in ctx.env else "not installed",
                    )
                ),
            )
        elif left < MIN_START_S:
            result = PartResult(
                part.name, part.title, "skipped", reason=f"not started: {max(left, 0):.0f} s of the time budget left"
            )
        else:
            result = run_part(part, ctx, min(part.timeout_s, left))
        results.append(result)
        if on_done is not None:
            on_done(result)
    return results


# ------------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(rows: List[Dict[str, Any]]) -> List[str]:
    columns: List[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def _md_figures(figures: Dict[str, Any]) -> List[str]:
    lines, tables = [], []
    for key, value in figures.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        elif isinstance(value, dict):
            lines.append(f"- {key}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()))
        elif isinstance(value, list):
            lines.append(f"- {key}: " + "; ".join(_fmt(v) for v in value))
        else:
            lines.append(f"- {key}: {_fmt(value)}")
    for key, rows in tables:
        lines += ["", f"{key}:", ""] + _md_table(rows)
    return lines


def _environment_lines(env: Dict[str, Any]) -> List[str]:
    te = env.get("transformer_engine") or f"not importable ({env.get('transformer_engine_error', 'not installed')})"
    bandwidth = env.get("memory_bandwidth_tbps")
    return [
        f"- Device: {env.get('device', 'n/a')} ({env.get('capability', '?')}, {_fmt(env.get('memory_gib'))} GiB), "
        f"{env.get('device_count', '?')} visible",
        f"- Driver {env.get('driver') or 'n/a'}, CUDA (torch) {env.get('torch_cuda') or 'n/a'}, "
        f"cuDNN {env.get('cudnn') or 'n/a'}",
        f"- torch {env.get('torch', 'n/a')}, Transformer Engine {te}, "
        f"megatron-core {env.get('megatron_core') or 'n/a'}, Triton {env.get('triton') or 'n/a'}, "
        f"DALI {env.get('dali') or 'n/a'}, apex {_fmt(env.get('apex'))}, Python {env.get('python', 'n/a')}",
        f"- Peak dense TFLOP/s (bf16 / fp8): {_fmt(env.get('peak_tflops_bf16'))} / {_fmt(env.get('peak_tflops_fp8'))}; "
        f"memory bandwidth {_fmt(bandwidth)} TB/s ({env.get('memory_bandwidth_source') or 'unknown'})",
    ] + [
        f"- {label}: {_fmt(env[key])}"
        for key, label in (("probe_error", "Environment probe failed"), ("tokenizer_error", "Demo tokenizer failed"))
        if key in env
    ]


def report_document(
    env: Dict[str, Any], results: Sequence[PartResult], started: datetime.datetime, seconds: float, budget_s: float
) -> Dict[str, Any]:
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    return {
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "budget_s": budget_s,
        "environment": env,
        "counts": counts,
        "ok": counts["failed"] == 0 and counts["timeout"] == 0,
        "parts": [asdict(r) for r in results],
    }


def render_markdown(doc: Dict[str, Any]) -> str:
    env, counts = doc["environment"], doc["counts"]
    minutes, secs = divmod(int(round(doc["duration_s"])), 60)
    lines = [
        "# GPU check",
        "",
        f"- Date: {doc['date']}; {minutes} min {secs:02d} s (budget {doc['budget_s']:.0f} s)",
        *_environment_lines(env),
        f"- Result: {counts['passed']} passed, {counts['failed']} failed, {counts['timeout']} timed out, "
        f"{counts['skipped']} skipped",
        "",
        "| part | status | time | summary |",
        "| --- | --- | --- | --- |",
    ]
    for p in doc["parts"]:
        summary = p["summary"] or p["reason"]
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']:.0f} s | {_fmt(summary) if summary else ''} |")
    for p in doc["parts"]:
        lines += ["", f"## {p['name']}: {p['status']}", "", p["title"]]
        if p["command"]:
            lines += [
                "",
                f"`{p['command']}` ({p['seconds']:.0f} s, exit code {_fmt(p['returncode'])}; log: `{p['log']}`)",
            ]
        if p["reason"]:
            lines += ["", f"**{p['reason']}**"]
        if p["figures"]:
            lines += [""] + _md_figures(p["figures"])
        if p["log_tail"]:
            lines += ["", "<details><summary>log tail</summary>", "", "````", p["log_tail"], "````", "", "</details>"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, doc: Dict[str, Any]) -> Tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    js.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md.write_text(render_markdown(doc))
    return md, js


# ------------------------------------------------------------------------------------------------------------
# The parts this check runs
# ------------------------------------------------------------------------------------------------------------

BENCH_RECIPE = "examples/configs/sail-vl-2b/3-sft-knowledge.yaml"
# One step = 4 packed rows of 4096 tokens (global batch 4 on one GPU): a few seconds per variant.
BENCH_ARGS = ("--steps", "5", "--warmup", "3", "--breakdown-steps", "1")
BENCH_OVERRIDES = ("data.seq_length=4096", "run.global_batch_size=4")


def _worker_command(name: str) -> Callable[[Context], List[str]]:
    return lambda ctx: [
        ctx.python,
        "-m",
        "sail_megatron.bench.gpu_check",
        "worker",
        name,
        str(ctx.figures_path(name)),
        "--root",
        str(ctx.root),
    ]


def _read_figures(name: str) -> Callable[[Context, str], Tuple[Dict[str, Any], str]]:
    def collect(ctx: Context, log: str) -> Tuple[Dict[str, Any], str]:
        path = ctx.figures_path(name)
        if not path.is_file():
            return {}, ""
        doc = json.loads(path.read_text())
        figures = dict(doc.get("figures", {}))
        if doc.get("failures"):
            figures["failures"] = doc["failures"]
        return figures, doc.get("summary", "")

    return collect


def _pytest_part(name: str, title: str, paths: Sequence[str], timeout_s: float) -> Part:
    def command(ctx: Context) -> List[str]:
        return [ctx.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *paths]

    def collect(ctx: Context, log: str) -> Tuple[Dict[str, Any], str]:
        import re

        summary = next(
            (
                line.strip("= ")
                for line in reversed(log.splitlines())
                if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line)
            ),
            "",
        )
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary)}
        return counts, summary

    return Part(name, title, timeout_s, command, collect)


def _bench_part(name: str, title: str, overrides: Sequence[str], timeout_s: float, needs_te: bool) -> Part:
    def command(ctx: Context) -> List[str]:
        if ctx.tokenizer is None:
            raise RuntimeError("no tokenizer: building the demo tokenizer failed (see the environment section)")
        return [
            ctx.python,
            "-m",
            "sail_megatron.bench",
            "--config",
            BENCH_RECIPE,
            *BENCH_ARGS,
            "--json",
            str(ctx.figures_path(name)),
            f"data.tokenizer={ctx.tokenizer}",
            *BENCH_OVERRIDES,
            *overrides,
        ]

    def collect(ctx: Context, log: str) -> Tuple[Dict[str, Any], str]:
        path = ctx.figures_path(name)
        if not path.is_file():
            return {}, ""
        return bench_figures(json.loads(path.read_text()))

    return Part(name, title, timeout_s, command, collect, needs_te=needs_te)


def bench_figures(doc: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    """The headline figures of a `sail-bench --json` document (its first measured variant)."""
    name, r = next(((n, v) for n, v in doc.get("results", {}).items() if "skipped" not in v), (None, None))
    if r is None:
        return {"skipped": {n: v.get("skipped") for n, v in doc.get("results", {}).items()}}, "no variant was measured"
    step = r.get("step_time_s", {})
    figures = {
        "variant": name,
        "device": doc.get("device"),
        "precision": doc.get("precision"),
        "fp8": doc.get("fp8"),
        "layers": doc.get("resolved_config", {}).get("precision", {}).get("layers"),
        "step time median (s)": step.get("median"),
        "tokens/s per GPU": r.get("tokens_per_s_per_device"),
        "samples/s": r.get("samples_per_s"),
        "tiles/s": r.get("tiles_per_s"),
        "TFLOP/s per GPU (ViT counted)": r.get("tflops_per_s_per_device"),
    }
    for key, label in (
        ("mfu", "MFU vs bf16 peak"),
        ("mfu_fp8", "MFU vs FP8 peak"),
        ("mfu_vs_bf16_peak", "MFU vs bf16 peak (older field)"),
    ):
        if r.get(key) is not None:
            figures[label] = r[key]
    figures.update(
        {
            "packing utilization": r.get("packing_utilization"),
            "data wait share": r.get("data_wait_frac"),
            "peak memory (GiB)": r.get("peak_memory_gib"),
            "final loss": r.get("final_loss"),
        }
    )
    if r.get("breakdown_s_per_step"):
        figures["breakdown (ms/step)"] = {k: 1000 * v for k, v in r["breakdown_s_per_step"].items()}
    mfu = r.get("mfu") if r.get("mfu") is not None else r.get("mfu_vs_bf16_peak")
    summary = (
        f"{_fmt(r.get('tokens_per_s_per_device'))} tok/s/GPU, {_fmt(r.get('tflops_per_s_per_device'))} TFLOP/s, "
        f"MFU {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'}"
    )
    if r.get("mfu_fp8") is not None:
        summary += f" ({100 * r['mfu_fp8']:.1f}% of the FP8 peak)"
    return figures, summary


def default_parts() -> List[Part]:
    return [
        _pytest_part(
            "pytest-gpu",
            "The GPU tests (tests/gpu): training steps on NCCL + CUDA, bf16 and (with Transformer Engine) FP8.",
            ["tests/gpu"],
            150,
        ),
        Part(
            "layers",
            "Transformer Engine vs megatron-core local layers on the same weights (bf16 logits): the tiny "
            "InternViT + Qwen2 and AIMv2 + Qwen3 models, a small sail-vl-2b-shaped one (ViT 2 of 5 layers, LM 2 "
            "layers, real widths and vocabulary) and a small sail-vl2-2b-shaped one (SAILViT-Huge 3 layers, "
            "Qwen3-1.7B 2 layers), on a padded batch and on a packed THD row.",
            180,
            _worker_command("layers"),
            _read_figures("layers"),
            needs_te=True,
        ),
        _bench_part(
            "train-bf16",
            f"sail-bench on {BENCH_RECIPE} (SAIL-VL-2B, every part trained), bf16, packed rows "
            "of 4096 tokens, global batch 4.",
            (),
            150,
            needs_te=False,
        ),
        _bench_part(
            "train-fp8",
            "The same with Transformer Engine FP8 (precision.fp8=hybrid, delayed scaling) in the language model.",
            ("precision.fp8=hybrid",),
            150,
            needs_te=True,
        ),
        Part(
            "kernels-bench",
            "The benchmarks/kernels scripts: compiled Triton kernels vs their PyTorch references at "
            "training sizes, GB/s against the device's memory bandwidth.",
            120,
            _worker_command("kernels-bench"),
            _read_figures("kernels-bench"),
        ),
        Part(
            "decode",
            "Image decode + tile + normalize: DALI (device 'mixed': nvJPEG and resize on the GPU) vs the "
            "PIL path, on 28 JPEGs (7 photographs at native size, 4 times each; 448 px tiles, up to 6 + "
            "thumbnail).",
            90,
            _worker_command("decode"),
            _read_figures("decode"),
        ),
        Part(
            "checkpoint",
            "A checkpoint written with local layers on the CPU (CUDA hidden) loaded into TE layers on "
            "the GPU through the `run.init_from` code; its logits against the CPU's.",
            180,
            _worker_command("checkpoint"),
            _read_figures("checkpoint"),
            needs_te=True,
        ),
        _pytest_part(
            "kernel-tests",
            "The kernel tests (tests/kernels): on CUDA they run the compiled kernels against "
            "their PyTorch references, forward and backward.",
            ["tests/kernels"],
            150,
        ),
    ]


# ------------------------------------------------------------------------------------------------------------
# The environment probe (in a subprocess: the parent never creates a CUDA context)
# ------------------------------------------------------------------------------------------------------------


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _driver_version() -> Optional[str]:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:
        return None


def memory_bandwidth(device_name: str, props: Any = None) -> Tuple[Optional[float], str]:
    """(bytes/s, where the figure comes from): the datasheet table, else the memory clock and bus width."""
    for key, tbps in MEMORY_BANDWIDTH_TBPS:
        if key.lower() in device_name.lower():
            return tbps * 1e12, f"datasheet figure for {key}"
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:  # double data rate
        return 2 * clock_khz * 1e3 * bus_bits / 8, "2 x memory clock x bus width"
    return None, "unknown device: GB/s without a percentage"


def probe_environment() -> Dict[str, Any]:
    import torch

    env: Dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "megatron_core": _version("megatron-core"),
        "triton": _version("triton"),
        "dali": _version("nvidia-dali-cuda120") or _version("nvidia-dali-cuda110"),
        "driver": _driver_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=torch.cuda.get_device_name(0),
            capability=f"sm_{props.major}{props.minor}",
            memory_gib=props.total_memory / 2**30,
            device_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
        )
        bandwidth, source = memory_bandwidth(env["device"], props)
        env.update(memory_bandwidth_tbps=bandwidth / 1e12 if bandwidth else None, memory_bandwidth_source=source)
        from sail_megatron.training.flops import peak_flops

        for dtype in ("bf16", "fp8"):
            peak = peak_flops(env["device"], dtype)
            env[f"peak_tflops_{dtype}"] = peak / 1e12 if peak else None
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401  (the part megatron uses; its extension must load)

        env["transformer_engine"] = getattr(transformer_engine, "__version__", None) or _version("transformer-engine")
    except Exception as e:
        env["transformer_engine"] = None
        env["transformer_engine_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    from sail_megatron.platform import detect_backends

    env["apex"] = detect_backends().apex
    return env


def _probe_in_subprocess(ctx: Context, timeout_s: float = 120) -> Dict[str, Any]:
    path = ctx.work / "environment.json"
    try:
        run = subprocess.run(
            [ctx.python, "-m", "sail_megatron.bench.gpu_check", "worker", "env", str(path), "--root", str(ctx.root)],
            cwd=ctx.root,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if run.returncode == 0 and path.is_file():
            return json.loads(path.read_text())["figures"]
        return {"probe_error": _tail(run.stdout + run.stderr, 15)}
    except subprocess.TimeoutExpired:
        return {"probe_error": f"the environment probe took over {timeout_s:.0f} s"}


def _build_tokenizer(ctx: Context) -> Tuple[Optional[Path], str]:
    """The demo tokenizer (a few seconds): sail-bench needs one, and synthetic rows need no more."""
    try:
        from sail_megatron.data.demo_dataset import DEMO_VOCAB_SIZE, demo_texts
        from sail_megatron.data.tokenizer import build_demo_tokenizer

        path = ctx.work / "tokenizer"
        build_demo_tokenizer(demo_texts(), path, vocab_size=DEMO_VOCAB_SIZE)
        return path, ""
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------------------------
# Workers: what runs inside the parts' subprocesses
# ------------------------------------------------------------------------------------------------------------


class _Figures:
    """A worker's results, rewritten to its JSON file after every item so a timeout keeps what was done."""

    def __init__(self, path: Path):
        self.path, self.figures, self.summary, self.failures = Path(path), {}, "", []

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(
            json.dumps(
                {"figures": self.figures, "summary": self.summary, "failures": self.failures}, indent=1, default=str
            )
        )

    def fail(self, what: str) -> None:
        print(f"FAILED: {what}", flush=True)
        self.failures.append(what)
        self.save()


def _check_models() -> Dict[str, Any]:
    """Both architecture pairs: the tiny presets, a small sail-vl-2b-shaped model (every width, head count and
    the vocabulary of the real one, 2 of 5 ViT layers built as select_layer -4 does, 2 language layers) and a
    small sail-vl2-2b-shaped one (SAILViT-Huge widths with 3 layers, Qwen3-1.7B widths with 2 layers: TE's
    fused RMSNorm+linear in the ViT, q/k norms, head_dim 128, tied embeddings)."""
    from sail_megatron.data.synthetic import IMG_CONTEXT
    from sail_megatron.model.presets import get_preset

    tiny, tiny_vl2 = get_preset("tiny"), get_preset("tiny-sail-vl2")
    small, small_vl2 = get_preset("sail-vl-2b"), get_preset("sail-vl2-2b")
    small.vision.num_layers = 5
    small.language.num_layers = 2
    small_vl2.vision.num_layers = 3
    small_vl2.language.num_layers = 2
    models = {"tiny": tiny, "tiny-sail-vl2": tiny_vl2, "sail-vl-2b-small": small, "sail-vl2-2b-small": small_vl2}
    for cfg in models.values():
        cfg.image_context_token_id = IMG_CONTEXT
    return models


def _check_batches(cfg) -> Dict[str, Any]:
    """A padded batch of two samples and one packed THD row of three, each with one image of 1-2 tiles."""

    from sail_megatron.data.batch import Batch
    from sail_megatron.data.synthetic import PAD, SyntheticConfig, SyntheticImageCaptions

    image_block = 2 + 2 * cfg.tokens_per_tile
    seq = 64 * math.ceil((image_block + 100) / 64)
    src = SyntheticImageCaptions(
        SyntheticConfig(
            seq_length=seq,
            micro_batch_size=1,
            image_size=cfg.vision.image_size,
            tokens_per_tile=cfg.tokens_per_tile,
            vocab_size=cfg.language.vocab_size,
            max_images=1,
            max_tiles_per_image=2,
            seed=11,
        )
    )
    padded = Batch.collate([src.sample(0), src.sample(1)])
    samples = [src.sample(i) for i in (2, 3, 4)]
    lengths = [min(int((s.tokens != PAD).sum()) + 1, seq) for s in samples]
    return {"padded": padded, "packed": Batch.pack(samples, lengths)}


def _logits(model, batch, device, every: int = 1):
    """[positions, vocab] logits of the batch (every `every`-th position of each row), fp32."""
    import torch

    from sail_megatron.training.step import packed_seq_params

    b = batch.to(device)
    with torch.no_grad():
        out = model(b.tokens, b.position_ids, None, pixel_values=b.pixel_values, packed_seq_params=packed_seq_params(b))
    vocab = model.model_config.language.vocab_size
    return out[:, ::every, :vocab].reshape(-1, vocab).float()


def compare_logits(reference, other) -> Dict[str, Any]:
    diff = other.float() - reference.float()
    rel = float(diff.norm() / reference.float().norm().clamp_min(1e-30))
    top1 = float((other.argmax(-1) == reference.argmax(-1)).float().mean())
    return {"rel_l2": rel, "max_abs": float(diff.abs().max()), "top1_agree": top1, "ok": rel <= MAX_REL_L2}


def _linear_class(model) -> str:
    return type(model.language_model.decoder.layers[0].self_attention.linear_qkv).__name__


def _free() -> None:
    """Give back the memory of models the caller has just deleted."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _attempt(fig: _Figures, what: str, fn: Callable[[], Any]) -> Any:
    """fn(), or None with the failure recorded: one broken model or batch does not stop the others."""
    try:
        return fn()
    except Exception:
        traceback.print_exc()
        fig.fail(f"{what}: {traceback.format_exc(limit=-1).strip().splitlines()[-1]}")
        return None


def _comparison_summary(rows: List[Dict[str, Any]], what: str) -> str:
    worst = max((r["rel_l2"] for r in rows if "rel_l2" in r), default=float("nan"))
    return f"{sum(bool(r.get('ok')) for r in rows)}/{len(rows)} {what} within rel L2 {MAX_REL_L2} (worst {worst:.3g})"


def worker_layers(fig: _Figures, root: Path) -> None:
    from sail_megatron.config import ParallelConfig, PrecisionConfig
    from sail_megatron.model.build import build_model
    from sail_megatron.platform import destroy_distributed, init_distributed
    from sail_megatron.training.checkpoint import load_checkpoint, save_checkpoint

    parallel = ParallelConfig()
    device = init_distributed(parallel, seed=1234).device
    rows: List[Dict[str, Any]] = []
    fig.figures["comparisons"] = rows
    try:
        for name, cfg in _check_models().items():
            directory = fig.path.parent / f"layers-{name}"
            shutil.rmtree(directory, ignore_errors=True)

            def build_both():
                # Same weights through a checkpoint: the TE layers' names and fused norms differ from local ones.
                local = build_model(cfg, parallel, PrecisionConfig(dtype="bf16", layers="local")).to(device).eval()
                save_checkpoint(directory, 0, [local])
                te = build_model(cfg, parallel, PrecisionConfig(dtype="bf16", layers="te")).to(device).eval()
                load_checkpoint(directory, [te])
                if not _linear_class(te).startswith("TE"):
                    raise RuntimeError(f"the TE model was built with {_linear_class(te)}")
                return local, te

            models = _attempt(fig, f"{name}: building the local and TE models", build_both)
            if models is None:
                continue
            local, te = models
            for kind, batch in _check_batches(cfg).items():
                began = time.perf_counter()
                result = _attempt(
                    fig,
                    f"{name} {kind}",
                    lambda: compare_logits(_logits(local, batch, device), _logits(te, batch, device)),
                )
                if result is None:
                    rows.append({"model": name, "batch": kind, "ok": False})
                    continue
                rows.append(
                    {
                        "model": name,
                        "batch": kind,
                        "layers": f"{_linear_class(local)} vs {_linear_class(te)}",
                        **result,
                        "seconds": time.perf_counter() - began,
                    }
                )
                if not result["ok"]:
                    fig.fail(f"{name} {kind}: TE vs local logits differ by {result['rel_l2']:.3g} (rel L2)")
                fig.save()
            shutil.rmtree(directory, ignore_errors=True)
            local = te = models = None
            _free()
    finally:
        destroy_distributed()
    fig.summary = _comparison_summary(rows, "TE-vs-local logit comparisons")


def worker_write_cpu_checkpoint(fig: _Figures, root: Path) -> None:
    """CUDA hidden: local layers in bf16 on the CPU write a checkpoint per model, plus reference logits. The
    logits come from an fp32 copy of the same weights: more exact, and fast on any CPU (bf16 matrix multiplies
    are slow on CPUs without bf16 instructions)."""
    import torch

    from sail_megatron.config import ParallelConfig, PrecisionConfig
    from sail_megatron.model.build import build_model
    from sail_megatron.platform import destroy_distributed, init_distributed
    from sail_megatron.training.checkpoint import save_checkpoint

    if torch.cuda.is_available():
        raise RuntimeError("the CPU writer must run with CUDA hidden (CUDA_VISIBLE_DEVICES='')")
    parallel = ParallelConfig()
    init_distributed(parallel, seed=4321)
    references = {}
    try:
        for name, cfg in _check_models().items():
            model = build_model(cfg, parallel, PrecisionConfig(dtype="bf16", layers="local")).eval()
            directory = fig.path.parent / "cpu-checkpoint" / name
            shutil.rmtree(directory, ignore_errors=True)
            save_checkpoint(directory, 1, [model], common={"written_by": "gpu-check CPU writer"})
            exact = build_model(cfg, parallel, PrecisionConfig(dtype="fp32", layers="local")).eval()
            exact.load_state_dict(model.state_dict())
            every = _positions_every(name)
            references[name] = {
                kind: _logits(exact, batch, torch.device("cpu"), every).to(torch.bfloat16)
                for kind, batch in _check_batches(cfg).items()
            }
            fig.figures[name] = {"linear class": _linear_class(model), "checkpoint": str(directory)}
            del model, exact
            _free()
    finally:
        destroy_distributed()
    torch.save(references, fig.path.parent / "cpu-checkpoint" / "reference_logits.pt")
    fig.summary = "written"


def _positions_every(name: str) -> int:
    """Logits kept for every n-th position: the small model's vocabulary makes all of them hundreds of MB."""
    return 1 if name.startswith("tiny") else 8


def worker_checkpoint(fig: _Figures, root: Path) -> None:
    import torch

    from sail_megatron.config import ParallelConfig, PrecisionConfig
    from sail_megatron.model.build import build_model
    from sail_megatron.platform import destroy_distributed, init_distributed
    from sail_megatron.training.checkpoint import load_checkpoint

    began = time.perf_counter()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "MASTER_PORT": str(free_port())}
    writer = subprocess.run(
        [
            sys.executable,
            "-m",
            "sail_megatron.bench.gpu_check",
            "worker",
            "write-cpu-checkpoint",
            str(fig.path.parent / "checkpoint-writer.json"),
            "--root",
            str(root),
        ],
        env=env,
        cwd=root,
    )
    fig.figures["CPU writer (s)"] = time.perf_counter() - began
    if writer.returncode != 0:
        fig.fail(f"the CPU writer (CUDA hidden) exited with {writer.returncode}")
        return
    base = fig.path.parent / "cpu-checkpoint"
    references = torch.load(base / "reference_logits.pt")
    parallel = ParallelConfig()
    device = init_distributed(parallel, seed=1).device
    rows: List[Dict[str, Any]] = []
    fig.figures["comparisons"] = rows
    try:
        for name, cfg in _check_models().items():

            def load():
                te = build_model(cfg, parallel, PrecisionConfig(dtype="bf16", layers="te")).to(device).eval()
                return te, load_checkpoint(base / name, [te])  # what run.init_from does

            loaded = _attempt(fig, f"{name}: loading the CPU checkpoint into TE layers", load)
            if loaded is None:
                continue
            te, info = loaded
            for kind, batch in _check_batches(cfg).items():
                every = _positions_every(name)
                result = _attempt(
                    fig,
                    f"{name} {kind}",
                    lambda: compare_logits(references[name][kind], _logits(te, batch, device, every).cpu()),
                )
                if result is None:
                    rows.append({"model": name, "batch": kind, "ok": False})
                    continue
                rows.append(
                    {
                        "model": name,
                        "batch": kind,
                        "loaded into": _linear_class(te),
                        "iteration": info["iteration"],
                        **result,
                    }
                )
                if not result["ok"]:
                    fig.fail(
                        f"{name} {kind}: the CPU-written checkpoint in TE layers gives logits "
                        f"{result['rel_l2']:.3g} (rel L2) from the CPU's"
                    )
                fig.save()
            te = loaded = None
            _free()
    finally:
        destroy_distributed()
    shutil.rmtree(base, ignore_errors=True)
    fig.summary = _comparison_summary(rows, "CPU-vs-TE logit comparisons")


def worker_kernels_bench(fig: _Figures, root: Path) -> None:
    """Runs each benchmarks/kernels script's main(), keeping the results its table prints."""
    import importlib

    import torch

    # As `python benchmarks/kernels/bench_x.py` runs them: the scripts import `harness` from their folder.
    scripts = root / "benchmarks" / "kernels"
    sys.path.insert(0, str(scripts))
    import harness

    props = torch.cuda.get_device_properties(0)
    bandwidth, source = memory_bandwidth(torch.cuda.get_device_name(0), props)
    fig.figures["memory bandwidth (TB/s)"] = bandwidth / 1e12 if bandwidth else None
    fig.figures["bandwidth source"] = source
    rows: List[Dict[str, Any]] = []
    fig.figures["kernels"] = rows
    show = harness.print_table

    def keep(title, results):
        for r in results:
            row = {
                "kernel": title,
                "case": r.case,
                "MB moved": r.bytes_moved / 1e6,
                "reference ms": r.reference_s * 1e3,
                "reference GB/s": r.bytes_moved / r.reference_s / 1e9,
            }
            if r.triton_s is not None:
                gbps = r.bytes_moved / r.triton_s / 1e9
                row.update(
                    {
                        "triton ms": r.triton_s * 1e3,
                        "triton GB/s": gbps,
                        "% of bandwidth": 100 * gbps * 1e9 / bandwidth if bandwidth else None,
                        "speed-up": r.reference_s / r.triton_s,
                    }
                )
            rows.append(row)
        fig.save()
        show(title, results)

    harness.print_table = keep
    for script in sorted(p.stem for p in scripts.glob("bench_*.py")):
        try:
            importlib.import_module(script).main()
        except Exception:
            traceback.print_exc()
            fig.fail(f"benchmarks/kernels/{script}.py failed")
    timed = [r for r in rows if "triton GB/s" in r]
    if timed:
        best = max(timed, key=lambda r: r["triton GB/s"])
        fig.summary = (
            f"{len(timed)} cases; best {best['triton GB/s']:.0f} GB/s"
            + (f" ({best['% of bandwidth']:.0f}% of bandwidth)" if best.get("% of bandwidth") else "")
            + f"; speed-up over the reference {min(r['speed-up'] for r in timed):.2f}x"
            f"-{max(r['speed-up'] for r in timed):.2f}x"
        )
    else:
        fig.fail("no Triton timing came back")


def worker_decode(fig: _Figures, root: Path) -> None:
    import io

    import torch
    from PIL import Image

    from sail_megatron.data.bench import sample_photos
    from sail_megatron.data.decode import build_tile_decoder
    from sail_megatron.data.tiling import plan_tiles

    tile, device = 448, torch.device("cuda")
    images = sample_photos() * 4
    plans = [plan_tiles(*Image.open(io.BytesIO(b)).size, 1, 6, tile, True) for b in images]
    tiles = sum(p.num_tiles for p in plans)
    decoders = {"pil": build_tile_decoder("pil", device), "dali-mixed": build_tile_decoder("dali", device)}
    outputs, rows = {}, []
    fig.figures.update({"images per batch": len(images), "tiles per batch": tiles, "paths": rows})
    for name, decode in decoders.items():
        repeats = 3 if name == "pil" else 10
        outputs[name] = decode(images, plans, tile)  # warm-up: DALI builds its pipeline here
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(repeats):
            decode(images, plans, tile)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - began) / repeats
        rows.append(
            {"path": name, "ms per batch": 1e3 * seconds, "images/s": len(images) / seconds, "tiles/s": tiles / seconds}
        )
        fig.save()
    for row in rows:
        row["vs pil"] = rows[0]["ms per batch"] / row["ms per batch"]
    level = 1 / 255 / 0.225  # one uint8 level after normalization
    diff = (outputs["dali-mixed"].float() - outputs["pil"].float()).abs() / level
    agreement = {
        "mean": float(diff.mean()),
        "p99": float(torch.quantile(diff.flatten()[::97].cpu(), 0.99)),
        "max": float(diff.max()),
    }
    fig.figures["DALI vs PIL tiles (uint8 levels)"] = agreement
    if agreement["mean"] > MAX_DECODE_MEAN_LEVELS:
        fig.fail(f"DALI's tiles differ from PIL's by {agreement['mean']:.2f} levels on average")
    fig.summary = (
        f"DALI mixed {rows[1]['images/s']:.0f} images/s vs PIL {rows[0]['images/s']:.1f} "
        f"({rows[1]['vs pil']:.1f}x); mean difference {agreement['mean']:.2f} levels"
    )


def worker_env(fig: _Figures, root: Path) -> None:
    fig.figures = probe_environment()


WORKERS: Dict[str, Callable[[_Figures, Path], None]] = {
    "env": worker_env,
    "layers": worker_layers,
    "write-cpu-checkpoint": worker_write_cpu_checkpoint,
    "checkpoint": worker_checkpoint,
    "kernels-bench": worker_kernels_bench,
    "decode": worker_decode,
}


def worker_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sail_megatron.bench.gpu_check worker")
    p.add_argument("name", choices=sorted(WORKERS))
    p.add_argument("out", type=Path)
    p.add_argument("--root", type=Path, default=Path.cwd())
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    fig = _Figures(args.out)
    try:
        WORKERS[args.name](fig, args.root.resolve())
    except Exception:
        traceback.print_exc()
        fig.failures.append(traceback.format_exc(limit=-3).strip().splitlines()[-1])
        fig.save()
        return 1
    fig.save()
    return 1 if fig.failures else 0


# ------------------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------------------


def cuda_problem() -> Optional[str]:
    """Why this machine cannot run the check, or None."""
    try:
        import torch
    except ImportError as e:
        return f"torch is not importable ({e})"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"torch {torch.__version__} ({build}) sees no CUDA device"
    return None


def main(argv: Optional[Sequence[str]] = None, root: Optional[Path] = None) -> int:
    parts = default_parts()
    names = [p.name for p in parts]
    ap = argparse.ArgumentParser(
        prog="gpu_check",
        description="One-shot check of the GPU-only paths; writes OUT/report.md and OUT/report.json (docs/gpu.md).",
    )
    ap.add_argument("--out", type=Path, default=Path("gpu_check"), help="report folder (default: gpu_check)")
    ap.add_argument("--only", action="append", choices=names, default=[], help="run only these parts (repeatable)")
    ap.add_argument("--skip", action="append", choices=names, default=[], help="leave these parts out (repeatable)")
    ap.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"seconds for the whole check; parts that do not fit are cut or skipped (default {DEFAULT_BUDGET_S})",
    )
    ap.add_argument("--list", action="store_true", help="list the parts and exit")
    args = ap.parse_args(argv)
    if args.list:
        for p in parts:
            print(f"{p.name:<14} {p.timeout_s:>4.0f} s  {p.title}")
        return 0
    problem = cuda_problem()
    if problem is not None:
        print(f"gpu-check needs a CUDA GPU: {problem}. Nothing was run.", file=sys.stderr)
        return 2
    root = Path(root or Path.cwd()).resolve()
    out = args.out if args.out.is_absolute() else root / args.out
    shutil.rmtree(out / "work", ignore_errors=True)
    shutil.rmtree(out / "logs", ignore_errors=True)
    ctx = Context(root=root, out=out)
    ctx.work.mkdir(parents=True, exist_ok=True)
    started, began = datetime.datetime.now().astimezone(), time.monotonic()
    print(f"gpu-check: probing the environment ({ctx.work / 'environment.json'})", flush=True)
    ctx.env = _probe_in_subprocess(ctx)
    ctx.tokenizer, error = _build_tokenizer(ctx)
    if error:
        ctx.env["tokenizer_error"] = error
    print("\n".join(_environment_lines(ctx.env)), flush=True)
    chosen = [p for p in parts if (not args.only or p.name in args.only) and p.name not in args.skip]

    def done(r: PartResult) -> None:
        print(f"gpu-check: {r.name:<14} {r.status:<8} {r.seconds:>5.0f} s  {r.summary or r.reason}", flush=True)

    results = run_parts(chosen, ctx, args.budget - (time.monotonic() - began), on_done=done)
    doc = report_document(ctx.env, results, started, time.monotonic() - began, args.budget)
    md, js = write_report(out, doc)
    counts = doc["counts"]
    print(
        f"gpu-check: {counts['passed']} passed, {counts['failed']} failed, {counts['timeout']} timed out, "
        f"{counts['skipped']} skipped; report: {md} and {js}",
        flush=True,
    )
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
