"""merge_vision at training sizes: N=8192 packed tokens, H=1536 / 3584, M = 256*k image tokens. Forward and backward.

Run: python benchmarks/kernels/bench_merge_vision.py   (or python -m benchmarks.kernels.bench_merge_vision)
"""

from __future__ import annotations

import torch

try:
    from .harness import device, on_cuda, print_table, run_case
except ImportError:  # run as a script
    from harness import device, on_cuda, print_table, run_case

from sail_megatron.kernels.merge_vision import merge_vision, merge_vision_reference

N = 8192


def main() -> None:
    dev = device()
    iters = 20 if on_cuda() else 5
    results = []
    for h in (1536, 3584):
        for k in (4, 16):  # 4 / 16 tiles of 256 tokens
            m = 256 * k
            text = torch.randn(N, h, device=dev, dtype=torch.bfloat16)
            vision = torch.randn(m, h, device=dev, dtype=torch.bfloat16)
            positions = torch.randperm(N, device=dev)[:m].sort().values
            if on_cuda():  # never time something wrong
                assert torch.equal(
                    merge_vision(text, vision, positions, impl="triton"),
                    merge_vision_reference(text, vision, positions),
                )
            el = 2  # bf16
            fwd_bytes = ((N - m) * h + m * h + N * h) * el  # read kept text rows + vision, write out
            results.append(
                run_case(
                    f"fwd N={N} H={h} M={m}",
                    fwd_bytes,
                    lambda: merge_vision(text, vision, positions, impl="reference"),
                    lambda: merge_vision(text, vision, positions, impl="triton"),
                    iters=iters,
                )
            )
            # Backward alone: grad_out -> grad_text (N rows) + grad_vision (M rows).
            grad = torch.randn(N, h, device=dev, dtype=torch.bfloat16)
            graphs = {}
            for impl in ("reference", "triton") if on_cuda() else ("reference",):
                t, v = text.clone().requires_grad_(True), vision.clone().requires_grad_(True)
                graphs[impl] = (merge_vision(t, v, positions, impl=impl), t, v)
            bwd_bytes = (N * h + N * h + m * h) * el

            def backward(impl: str) -> None:
                out, t, v = graphs[impl]
                torch.autograd.grad(out, (t, v), grad, retain_graph=True)

            results.append(
                run_case(
                    f"bwd N={N} H={h} M={m}",
                    bwd_bytes,
                    lambda: backward("reference"),
                    lambda: backward("triton"),
                    iters=iters,
                )
            )
    print_table("merge_vision (bf16)", results)


if __name__ == "__main__":
    main()
