"""Triton kernels, installed as `sail_megatron.kernels`; each kernel file keeps its PyTorch reference beside it."""
