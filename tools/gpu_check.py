#!/usr/bin/env python
"""`make gpu-check`: a one-shot check of everything that only runs on a GPU (tests, Transformer Engine vs
local layers, the ViT in FP8, bf16/FP8 training throughput and MFU, Triton kernels, DALI decoding, CPU-written
checkpoints in TE layers, torchrun's restart). Writes gpu_check/report.md, gpu_check/report.json and
gpu_check/summary.txt; exits 2 without a CUDA GPU, 1 when a part failed or timed out. See docs/gpu.md.

    python tools/gpu_check.py [--out DIR] [--only PART ...] [--skip PART ...] [--budget SECONDS] [--list]
"""

import sys
from pathlib import Path

from sail_megatron.bench.gpu_check import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], root=Path(__file__).resolve().parents[1]))
