"""Image throughput per CPU core for decode + tile + normalize, three ways side by side in one run:
the DALI decoder (CPU backend, one thread), the project's PIL path, and a baseline written the way
InternVL's loader works (PIL open, dynamic_preprocess with per-tile crops, per-tile bicubic resize,
to-tensor and normalize per tile). Ratios are meaningful on any machine; absolute figures only here.
"""

import argparse
import io
import time
from typing import Callable, Dict, List

import numpy as np
import torch
from PIL import Image

from sail_megatron.data.decode_pil import IMAGENET_MEAN, IMAGENET_STD, PilTileDecoder
from sail_megatron.data.tiling import TilePlan, plan_tiles

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def internvl_baseline(data: bytes, plan: TilePlan, tile_size: int) -> torch.Tensor:
    """InternVL's load_image: tiles as PIL crops, then Resize/ToTensor/Normalize on each tile."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    cols, rows = plan.cols, plan.rows
    resized = image.resize((tile_size * cols, tile_size * rows))
    tiles = [
        resized.crop(
            ((i % cols) * tile_size, (i // cols) * tile_size, (i % cols + 1) * tile_size, (i // cols + 1) * tile_size)
        )
        for i in range(cols * rows)
    ]
    if plan.thumbnail:
        tiles.append(image.resize((tile_size, tile_size)))
    out = []
    for tile in tiles:  # torchvision's T.Resize((S, S), BICUBIC) -> ToTensor -> Normalize, per tile
        tile = tile.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(tile, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        out.append((x - _MEAN) / _STD)
    return torch.stack(out)


def sample_photos() -> List[bytes]:
    """Real photographs bundled with scikit-image, as JPEGs at their native sizes."""
    import skimage.data as skdata

    images = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "camera"):
        array = getattr(skdata, name)()
        buf = io.BytesIO()
        Image.fromarray(array).convert("RGB").save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    return images


def _time(fn: Callable[[], int], repeats: int) -> float:
    fn()  # warm-up (DALI builds its pipeline here)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def run(images: List[bytes], tile_size: int = 448, max_tiles: int = 6, repeats: int = 3) -> Dict[str, dict]:
    torch.set_num_threads(1)  # per-core figures: every path gets one thread
    plans = []
    for data in images:
        w, h = Image.open(io.BytesIO(data)).size
        plans.append(plan_tiles(w, h, 1, max_tiles, tile_size, True))
    tiles = sum(p.num_tiles for p in plans)
    paths = {
        "internvl_baseline": lambda: [internvl_baseline(b, p, tile_size) for b, p in zip(images, plans)],
        "pil": lambda: PilTileDecoder()(images, plans, tile_size),
    }
    try:
        from sail_megatron.data.decode_dali import DaliTileDecoder

        dali = DaliTileDecoder(torch.device("cpu"), num_threads=1)
        paths["dali_cpu"] = lambda: dali(images, plans, tile_size)
    except ImportError:
        pass
    results = {}
    for name, fn in paths.items():
        seconds = _time(fn, repeats)
        results[name] = {"images_per_s": len(images) / seconds, "tiles_per_s": tiles / seconds}
    base = results["internvl_baseline"]["images_per_s"]
    for r in results.values():
        r["vs_baseline"] = r["images_per_s"] / base
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tile-size", type=int, default=448)
    p.add_argument("--max-tiles", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    images = sample_photos()
    results = run(images, args.tile_size, args.max_tiles, args.repeats)
    print(f"{len(images)} photos, tile {args.tile_size}, max {args.max_tiles} tiles + thumbnail, 1 thread each")
    print(f"{'path':<20}{'images/s/core':>15}{'tiles/s/core':>15}{'vs baseline':>13}")
    for name, r in results.items():
        print(f"{name:<20}{r['images_per_s']:>15.2f}{r['tiles_per_s']:>15.1f}{r['vs_baseline']:>12.2f}x")


if __name__ == "__main__":
    main()
