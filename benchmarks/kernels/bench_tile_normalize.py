"""tiles_from_grid / normalize_hwc on a dynamic-resolution image: a 2x3 grid of 448px tiles (+ thumbnail batch).

Run: python benchmarks/kernels/bench_tile_normalize.py   (or python -m benchmarks.kernels.bench_tile_normalize)
"""

from __future__ import annotations

import torch

try:
    from .harness import device, on_cuda, print_table, run_case
except ImportError:  # run as a script
    from harness import device, on_cuda, print_table, run_case

from sail_megatron.kernels.tile_normalize import (
    normalize_hwc,
    normalize_hwc_reference,
    tiles_from_grid,
    tiles_from_grid_reference,
)

ROWS, COLS, S = 2, 3, 448


def main() -> None:
    dev = device()
    iters = 20 if on_cuda() else 5
    image = torch.randint(0, 256, (ROWS * S, COLS * S, 3), dtype=torch.uint8, device=dev)
    tiles = torch.randint(0, 256, (ROWS * COLS + 1, S, S, 3), dtype=torch.uint8, device=dev)
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        el = torch.empty(0, dtype=dtype).element_size()
        name = str(dtype).replace("torch.", "")
        if on_cuda():
            torch.testing.assert_close(
                tiles_from_grid(image, ROWS, COLS, S, dtype=dtype, impl="triton"),
                tiles_from_grid_reference(image, ROWS, COLS, S, dtype=dtype),
                atol=1e-6,
                rtol=2.0**-7,
            )
            torch.testing.assert_close(
                normalize_hwc(tiles, dtype=dtype, impl="triton"),
                normalize_hwc_reference(tiles, dtype=dtype),
                atol=1e-6,
                rtol=2.0**-7,
            )
        results.append(
            run_case(
                f"tiles_from_grid {ROWS}x{COLS}x{S} {name}",
                image.numel() * (1 + el),
                lambda: tiles_from_grid(image, ROWS, COLS, S, dtype=dtype, impl="reference"),
                lambda: tiles_from_grid(image, ROWS, COLS, S, dtype=dtype, impl="triton"),
                iters=iters,
            )
        )
        results.append(
            run_case(
                f"normalize_hwc {tiles.shape[0]}x{S} {name}",
                tiles.numel() * (1 + el),
                lambda: normalize_hwc(tiles, dtype=dtype, impl="reference"),
                lambda: normalize_hwc(tiles, dtype=dtype, impl="triton"),
                iters=iters,
            )
        )
    print_table("tile normalize (uint8 HWC -> CHW)", results)


if __name__ == "__main__":
    main()
