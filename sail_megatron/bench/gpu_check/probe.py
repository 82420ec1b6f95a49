"""The environment probe: device, driver, versions, peak FLOP/s and memory bandwidth. It runs as a worker
subprocess, so the check's own process never creates a CUDA context."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from sail_megatron.bench.gpu_check.helpers import Figures
from sail_megatron.bench.gpu_check.runner import Context, tail
from sail_megatron.bench.gpu_check.worker import worker_command

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


def worker(fig: Figures, root: Path) -> None:
    fig.figures = probe_environment()


def probe_in_subprocess(ctx: Context, timeout_s: float = 120) -> Dict[str, Any]:
    path = ctx.figures_path("environment")
    try:
        run = subprocess.run(
            worker_command("env", path)(ctx), cwd=ctx.root, capture_output=True, text=True, timeout=timeout_s
        )
        if run.returncode == 0 and path.is_file():
            return json.loads(path.read_text())["figures"]
        return {"probe_error": tail(run.stdout + run.stderr, 15)}
    except subprocess.TimeoutExpired:
        return {"probe_error": f"the environment probe took over {timeout_s:.0f} s"}
