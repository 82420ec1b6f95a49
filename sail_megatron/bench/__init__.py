"""`sail-bench`: training throughput, MFU with the ViT counted, step-time breakdown, side-by-side comparisons."""
