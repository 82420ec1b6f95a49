"""`decode`: image decode + tile + normalize with DALI on the GPU (device 'mixed': nvJPEG and resize there)
against the PIL path: images/s, tiles/s and how far DALI's tiles are from PIL's."""

from __future__ import annotations

import time
from pathlib import Path

from sail_megatron.bench.gpu_check.helpers import Figures
from sail_megatron.bench.gpu_check.runner import Part
from sail_megatron.bench.gpu_check.worker import read_figures, worker_command

NAME = "decode"
# DALI on nvJPEG vs Pillow/libjpeg, in uint8 levels after normalization: IDCT, chroma upsampling and cubic
# kernels differ a little (the CPU backend measures 0.16 levels mean); a wrong picture is tens of levels off.
MAX_DECODE_MEAN_LEVELS = 2.0


def worker(fig: Figures, root: Path) -> None:
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


def part(timeout_s: float) -> Part:
    return Part(
        NAME,
        "Image decode + tile + normalize: DALI (device 'mixed': nvJPEG and resize on the GPU) vs the "
        "PIL path, on 28 JPEGs (7 photographs at native size, 4 times each; 448 px tiles, up to 6 + "
        "thumbnail).",
        timeout_s,
        worker_command(NAME),
        read_figures(NAME),
    )
