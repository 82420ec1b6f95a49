"""pixel_shuffle at InternViT-300M sizes: 24 tiles, a 32x32 patch grid, 1024 channels, ratio 0.5. Fwd and bwd.

Run: python benchmarks/kernels/bench_pixel_shuffle.py   (or python -m benchmarks.kernels.bench_pixel_shuffle)
"""

from __future__ import annotations

import torch

try:
    from .harness import device, on_cuda, print_table, run_case
except ImportError:  # run as a script
    from harness import device, on_cuda, print_table, run_case

from sail_megatron.kernels.pixel_shuffle import pixel_shuffle, pixel_shuffle_reference


def main() -> None:
    dev = device()
    iters = 20 if on_cuda() else 5
    n, g, c = 24, 32, 1024
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        # InternVL slices off the CLS token first, so the real input is a strided view.
        full = torch.randn(n, g * g + 1, c, device=dev, dtype=dtype)
        x = full[:, 1:, :]
        if on_cuda():
            assert torch.equal(pixel_shuffle(x, impl="triton"), pixel_shuffle_reference(x))
        nbytes = 2 * x.numel() * x.element_size()  # read every element once, write it once
        name = str(dtype).replace("torch.", "")
        results.append(
            run_case(
                f"fwd n={n} g={g} c={c} {name}",
                nbytes,
                lambda: pixel_shuffle(x, impl="reference"),
                lambda: pixel_shuffle(x, impl="triton"),
                iters=iters,
            )
        )
        grad = torch.randn(n, (g // 2) ** 2, 4 * c, device=dev, dtype=dtype)
        graphs = {}
        for impl in ("reference", "triton") if on_cuda() else ("reference",):
            leaf = full.clone().requires_grad_(True)
            graphs[impl] = (pixel_shuffle(leaf[:, 1:, :], impl=impl), leaf)

        def backward(impl: str) -> None:
            out, leaf = graphs[impl]
            torch.autograd.grad(out, leaf, grad, retain_graph=True)

        # The gradient of the CLS slice adds a zero-fill + copy into full; the table counts only the shuffle.
        results.append(
            run_case(
                f"bwd n={n} g={g} c={c} {name}",
                nbytes,
                lambda: backward("reference"),
                lambda: backward("triton"),
                iters=iters,
            )
        )
    print_table("pixel_shuffle (ratio 0.5, v2)", results)


if __name__ == "__main__":
    main()
