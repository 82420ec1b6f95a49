"""Conversion time and peak memory on a random checkpoint with a preset's real shapes (bf16).

Writes a random folder in the preset's Hugging Face layout (default sail-vl-2b: InternViT-300M, 24
layers, select_layer -4, Qwen2.5-1.5B with an untied lm_head, about 4.2 GB; sail-vl2-2b: SAILViT-Huge +
Qwen3-1.7B in SAIL-VL2's layout), streamed one tensor at a time; then runs
`sail-convert hf-to-mcore` and `sail-convert mcore-to-hf` each in a subprocess while sampling the
memory of its whole process tree every 50 ms. Reports wall time, peak PSS of the tree (shared pages
counted once: megatron's checkpoint writer forks helper processes), peak RSS of the main process
(VmHWM) and both as a ratio of the checkpoint's size; then checks the exported tensors are bitwise the
input's. Everything lives under --workdir and is deleted at the end.

    python benchmarks/convert/bench_convert.py [--preset sail-vl2-2b] [--tp 2] [--workdir DIR] [--keep]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sail_megatron.convert import mapping  # noqa: E402
from sail_megatron.convert.hf_config import hf_config_from_model, write_json  # noqa: E402
from sail_megatron.convert.hf_io import SafetensorsFolder, ShardedSafetensorsWriter  # noqa: E402
from sail_megatron.model.presets import get_preset  # noqa: E402


def _template(cfg) -> dict:
    """config.json fields beyond the ones hf_config_from_model writes, as each family's release has them."""
    llm = {
        "architectures": [cfg.language.spec.hf_architecture],
        "model_type": cfg.language.spec.hf_model_type,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    if cfg.vision.arch == "internvit":
        vision = {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_act": "gelu",
            "num_channels": 3,
        }
        return {"llm_config": llm, "vision_config": vision, "template": "internvl2_5", "force_image_size": 448}
    sail_vl2 = cfg.language.arch == "qwen3"
    vision = {
        "architectures": ["SAILViTModel" if sail_vl2 else "AIMv2Model"],
        "model_type": "sailvit" if sail_vl2 else "aimv2",
        "qkv_bias": False,
        "use_bias": False,
    }
    return {
        "llm_config": llm,
        "vision_config": vision,
        "model_type": "sailvl" if sail_vl2 else "internvl_chat",
        "architectures": ["SAILVLModel" if sail_vl2 else "SailVLModel"],
        "template": "univl-chat" if sail_vl2 else "sailvl-chat",
        "force_image_size": 448,
        "select_layer": cfg.vision.select_layer,
        "ps_version": "v2",
    }


def write_random_checkpoint(folder: Path, preset: str, seed: int = 0) -> int:
    """A random folder with the preset's real shapes, written tensor by tensor; returns its bytes."""
    cfg = get_preset(preset)
    folder.mkdir(parents=True)
    shapes = mapping.expected_hf_shapes(cfg, lm_head_stored=False)
    writer = ShardedSafetensorsWriter(folder, [(n, torch.bfloat16, s) for n, s in shapes.items()], 2 << 30)
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        writer.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    write_json(folder / "config.json", hf_config_from_model(cfg, _template(cfg), "bf16"))
    return writer.total


def _tree(pid: int) -> List[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        pids += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return pids


def _field_kb(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: List[str]) -> Dict[str, float]:
    """Run `cmd`; wall time, peak tree PSS and main-process peak RSS in bytes."""
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"pss": 0, "hwm": 0}

    def sample() -> None:
        while proc.poll() is None:
            pss = sum(_field_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in _tree(proc.pid))
            peak["pss"] = max(peak["pss"], pss)
            peak["hwm"] = max(peak["hwm"], _field_kb(f"/proc/{proc.pid}/status", "VmHWM:"))
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"seconds": time.perf_counter() - began, "peak_pss": peak["pss"] * 1024, "peak_rss": peak["hwm"] * 1024}


def bitwise_equal(a: Path, b: Path) -> Tuple[bool, int]:
    with SafetensorsFolder(a) as x, SafetensorsFolder(b) as y:
        if set(x.tensors) != set(y.tensors):
            return False, 0
        return all(torch.equal(x.read(n), y.read(n)) for n in x.tensors), len(x.tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sail-vl-2b", help="model shapes (sail_megatron/config/presets.py)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size hf-to-mcore targets")
    parser.add_argument("--workdir", default="/tmp/sail-convert-bench")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    try:
        t0 = time.perf_counter()
        size = write_random_checkpoint(work / "hf", args.preset)
        print(
            f"random {args.preset} checkpoint: {size / 1e9:.2f} GB bf16 written in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        tool = [sys.executable, str(ROOT / "tools" / "sail_convert.py")]
        to_mcore = ["hf-to-mcore", "--hf", str(work / "hf"), "--out", str(work / "mcore"), "--tp", str(args.tp)]
        to_hf = ["mcore-to-hf", "--ckpt", str(work / "mcore"), "--out", str(work / "hf2")]
        rows = [("hf-to-mcore", run_measured(tool + to_mcore)), ("mcore-to-hf", run_measured(tool + to_hf))]
        same, count = bitwise_equal(work / "hf", work / "hf2")
        configs = [json.loads((work / d / "config.json").read_text()) for d in ("hf", "hf2")]
        config_same = configs[0] == configs[1]
        print(f"{'command':<14}{'wall s':>8}{'peak PSS GB':>13}{'ratio':>7}{'peak RSS GB':>13}{'ratio':>7}")
        for name, r in rows:
            print(
                f"{name:<14}{r['seconds']:>8.1f}{r['peak_pss'] / 1e9:>13.2f}{r['peak_pss'] / size:>7.2f}"
                f"{r['peak_rss'] / 1e9:>13.2f}{r['peak_rss'] / size:>7.2f}"
            )
        print(f"round trip: {count} tensors bitwise equal: {same}; config.json identical: {config_same}")
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
