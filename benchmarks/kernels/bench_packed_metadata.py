"""packed_metadata at packed-sequence sizes: N = 8192..65536 tokens, ~40% image tokens, 8 samples per pack.

Run: python benchmarks/kernels/bench_packed_metadata.py   (or python -m benchmarks.kernels.bench_packed_metadata)
"""

from __future__ import annotations

import torch

try:
    from .harness import device, on_cuda, print_table, run_case
except ImportError:  # run as a script
    from harness import device, on_cuda, print_table, run_case

from sail_megatron.kernels.packed_metadata import packed_metadata, packed_metadata_reference

IMG = 151667  # an <IMG_CONTEXT>-like id


def main() -> None:
    dev = device()
    iters = 20 if on_cuda() else 5
    results = []
    for n in (8192, 16384, 32768, 65536):
        tokens = torch.where(torch.rand(n) < 0.4, IMG, torch.randint(0, 150000, (n,))).to(dev)
        cu = torch.linspace(0, n, 9).round().int().to(dev)  # 8 samples
        m = int((tokens == IMG).sum())
        if on_cuda():
            got = packed_metadata(tokens, cu, IMG, impl="triton")
            want = packed_metadata_reference(tokens, cu, IMG)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        nbytes = n * 8 + cu.numel() * 4 + n * 8 + m * 8  # read tokens + cu_seqlens, write positions + indices
        results.append(
            run_case(
                f"N={n} M={m}",
                nbytes,
                lambda: packed_metadata(tokens, cu, IMG, impl="reference"),
                lambda: packed_metadata(tokens, cu, IMG, impl="triton"),
                iters=iters,
            )
        )
        if on_cuda():  # the hint only changes the Triton path (no host sync); on CPU this row would repeat
            results.append(
                run_case(
                    f"N={n} M={m}, count given (no sync)",
                    nbytes,
                    lambda: packed_metadata(tokens, cu, IMG, impl="reference"),
                    lambda: packed_metadata(tokens, cu, IMG, impl="triton", num_image_tokens=m),
                    iters=iters,
                )
            )
    print_table("packed_metadata (int64 tokens)", results)


if __name__ == "__main__":
    main()
