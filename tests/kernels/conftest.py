"""Kernel tests run on every machine: compiled on CUDA, in Triton's CPU interpreter without a GPU.

Why here and how: `@triton.jit` decides compiled vs interpreted when it runs, i.e. when a kernel module is
imported, by reading TRITON_INTERPRET at that moment (setting it later changes nothing; there is no per-call
switch). pytest imports this conftest before any test module of this folder, so without CUDA we set the
variable here, before the test modules import the kernels. It stays set for the rest of the session: on a
CPU-only machine interpreting is the only way a Triton kernel can run, and the interpreter reads the knob
while executing.

Two things may already be imported compiled when we get here (a full `pytest` run collects tests/config,
tests/data, ... first, and megatron-core imports triton):
  * triton itself, with its @jit library helpers (tl.sum, tl.cdiv, ...): our kernels do not call those
    (kernels/_common.py), so it does not matter;
  * our kernel modules: they are dropped from sys.modules (and their package attribute), so the test
    modules' imports re-decorate them interpreted. Earlier importers keep their copies, which on CPU only
    ever take the reference path.
A subprocess per test would also work but costs a torch import (seconds) each time.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [m for m in sys.modules if m.startswith("sail_megatron.kernels.")]:
        del sys.modules[_name]
        # `from sail_megatron.kernels import x` reads the package attribute before sys.modules: drop it too.
        _parent, _, _child = _name.rpartition(".")
        if hasattr(sys.modules.get(_parent), _child):
            delattr(sys.modules[_parent], _child)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """Where the Triton-vs-reference tests put their tensors: CUDA when present, else the interpreter's CPU."""
    return DEVICE
