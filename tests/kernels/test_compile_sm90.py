"""Every Triton kernel in kernels/ compiles for Hopper (sm_90, to PTX and cubin), on any machine.

The interpreter tests next to this file check what the kernels compute, but the interpreter never runs
Triton's GPU compiler: a kernel can pass them and still fail to compile on an H100. Triton compiles for
a named target without a GPU (its wheel ships ptxas), so this test does that for every kernel, at the
dtypes the model feeds it.

Signatures and block sizes are not written out by hand. Each case calls the kernel's public function
(forward and backward) on small CPU tensors shaped like a real recipe (examples/configs/*/_base.yaml),
with every `@triton.jit` kernel of the module swapped for a recorder: the launchers run as they would
on a GPU and choose their grids and constexprs, and the recorder keeps the arguments of each launch
instead of running it. Each distinct launch is then compiled with `triton.compile` for
`GPUTarget("cuda", 90, 32)`: tensors become pointers of their dtype, Python ints `i32`/`i64`, floats
`fp32`, and ints equal to 1 become constexprs, as Triton specializes them on a real launch. (Triton's
16-byte alignment hints are not applied, so this compiles the general variant of each kernel.)

Why a subprocess: tests/kernels/conftest.py sets TRITON_INTERPRET=1 on CPU-only machines before the
kernel modules are imported, which turns every `@triton.jit` function into an interpreted one that
Triton's compiler cannot take. The compiling happens in one child Python started without that variable
(and with a fresh Triton cache, so it really compiles); it writes a JSON result per case and the tests
below read it.

Run: .venv/bin/python -m pytest tests/kernels/test_compile_sm90.py
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS_DIR = ROOT / "kernels"
RECIPE_BASES = sorted((ROOT / "examples" / "configs").glob("*/_base.yaml"))
ARCH, WARP_SIZE = 90, 32
MAX_SHARED_BYTES = 227 * 1024  # H100/H200: the most shared memory one block may use

FLOATS = ("bf16", "fp16", "fp32")
# (kernel module, dtype): what the model feeds each kernel. tile_normalize reads uint8 pixels and writes the
# dtype; packed_metadata's dtype is the token ids' (with int32 cu_seqlens, as the model passes them, and int64).
CASES = (
    [("merge_vision", d) for d in FLOATS]
    + [("pixel_shuffle", d) for d in FLOATS]
    + [("tile_normalize", d) for d in FLOATS]
    + [("packed_metadata", d) for d in ("int64", "int32")]
)


def case_id(module: str, dtype: str) -> str:
    return f"{module}-{dtype}"


# --------------------------------------------------------------------------------------------------------
# The child: capture the launches, compile them. Runs with TRITON_INTERPRET unset (see the module docstring).
# --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _recipe_shapes() -> tuple[dict, ...]:
    """The shapes that decide block sizes, from each model family's base recipe and preset."""
    from sail_megatron.config.train import load_train_config

    shapes = []
    for base in RECIPE_BASES:
        cfg = load_train_config(base)
        m = cfg.model
        shapes.append(
            dict(
                recipe=base.parent.name,
                seq_length=cfg.data.seq_length,
                tile_size=m.vision.image_size,
                patches=m.vision.num_patches,
                vision_hidden=m.vision.hidden_size,
                hidden=m.language.hidden_size,
                tokens_per_tile=m.tokens_per_tile,
                downsample_ratio=m.projector.downsample_ratio,
            )
        )
    return tuple(shapes)


def _torch_dtype(name: str):
    import torch

    return {
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp32": torch.float32,
        "int64": torch.int64,
        "int32": torch.int32,
    }[name]


def _exercise(module: str, dtype: str, shape: dict) -> None:
    """Call the module's public functions the way the model and the data path do (forward and backward)."""
    import torch

    from sail_megatron.kernels import merge_vision, packed_metadata, pixel_shuffle, tile_normalize

    tiles = 2  # block sizes depend on widths and tile sides, not on how many tiles there are
    if module == "merge_vision":
        n, h, m = shape["seq_length"], shape["hidden"], tiles * shape["tokens_per_tile"]
        positions = torch.arange(m) * (n // m)
        # Stage 1 trains only the projector (no grad for the text), frozen projectors give none for vision.
        for text_grad, vision_grad in ((True, True), (False, True), (True, False)):
            text = torch.zeros(n, h, dtype=_torch_dtype(dtype), requires_grad=text_grad)
            vision = torch.zeros(m, h, dtype=_torch_dtype(dtype), requires_grad=vision_grad)
            out = merge_vision.merge_vision(text, vision, positions, impl="triton")
            out.backward(torch.zeros_like(out))
    elif module == "pixel_shuffle":
        x = torch.zeros(tiles, shape["patches"], shape["vision_hidden"], dtype=_torch_dtype(dtype), requires_grad=True)
        for version in pixel_shuffle.PS_VERSIONS:
            out = pixel_shuffle.pixel_shuffle(x, shape["downsample_ratio"], version, impl="triton")
            out.backward(torch.zeros_like(out))
    elif module == "tile_normalize":
        s, out_dt = shape["tile_size"], _torch_dtype(dtype)
        grid = torch.zeros(2 * s, 3 * s, 3, dtype=torch.uint8)  # a 2x3 grid as DALI resizes it, HWC
        tile_normalize.tiles_from_grid(grid, 2, 3, s, dtype=out_dt, impl="triton")
        tile_normalize.normalize_hwc(torch.zeros(1, s, s, 3, dtype=torch.uint8), dtype=out_dt, impl="triton")
    elif module == "packed_metadata":
        n, m = shape["seq_length"], tiles * shape["tokens_per_tile"]
        tokens = torch.zeros(n, dtype=_torch_dtype(dtype))
        # The model passes the whole row as one int32 span; per-sample offsets make the binary search loop.
        for samples, cu_dt in ((1, torch.int32), (8, torch.int32), (8, torch.int64)):
            cu_seqlens = torch.linspace(0, n, samples + 1).to(cu_dt)
            # With the count given, as the model does on CUDA (no host sync on the captured, unfilled counts).
            packed_metadata.packed_metadata(tokens, cu_seqlens, 7, impl="triton", num_image_tokens=m)
    else:
        raise KeyError(f"no compile case for kernel module {module!r}")


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def _capture(module: str, dtype: str) -> list:
    """(kernel, args, kwargs) of every launch, over the recipes' shapes."""
    import importlib
    from unittest import mock

    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(f"sail_megatron.kernels.{module}")
    kernels = {
        name: obj
        for name, obj in vars(mod).items()
        if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__
    }
    if not kernels:
        raise RuntimeError(f"{mod.__name__} has no compiled @triton.jit kernels: is TRITON_INTERPRET set?")
    launches: list = []
    with mock.patch.multiple(mod, **{name: _Recorder(k, launches) for name, k in kernels.items()}):
        for shape in _recipe_shapes():
            _exercise(module, dtype, shape)
    return launches


def _specialize(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of one launch, as Triton would build them for a GPU."""
    import inspect

    from triton.runtime.jit import mangle_type

    params = {p.name: p for p in kernel.params}
    bound = inspect.signature(kernel.fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    options = {k: v for k, v in kwargs.items() if k not in params}  # num_warps=..., num_stages=...
    signature, constexprs = {}, {}
    for name, value in bound.arguments.items():
        p = params[name]
        if p.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif type(value) is int and value == 1 and not p.do_not_specialize:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = mangle_type(value)
    return signature, constexprs, options


def _compile(kernel, signature: dict, constexprs: dict, options: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", ARCH, WARP_SIZE),
        options=options or None,
    )
    target = re.search(r"^\s*\.target\s+(\S+)", compiled.asm.get("ptx", ""), re.M)
    return {
        "ptx_target": target.group(1) if target else None,
        "cubin_bytes": len(compiled.asm.get("cubin", b"")),
        "shared_bytes": compiled.metadata.shared,
    }


def compile_all(out: Path) -> None:
    """The child's work: every case's launches compiled, one JSON document of results."""
    from triton.runtime.jit import JITFunction

    import sail_megatron.kernels._common as common

    if os.environ.get("TRITON_INTERPRET") or not isinstance(common.cast_rne, JITFunction):
        raise RuntimeError("the kernels were decorated for the interpreter: start this without TRITON_INTERPRET")
    done: dict = {}  # one compile per distinct (kernel, signature, constexprs, options)
    results = {}
    for module, dtype in CASES:
        entry = {"error": None, "launches": []}
        try:
            for kernel, args, kwargs in _capture(module, dtype):
                signature, constexprs, options = _specialize(kernel, args, kwargs)
                key = json.dumps([kernel.fn.__name__, signature, constexprs, options], sort_keys=True, default=str)
                if key not in done:
                    try:
                        done[key] = {"error": None, **_compile(kernel, signature, constexprs, options)}
                    except Exception:
                        done[key] = {"error": traceback.format_exc(limit=-8)}
                    done[key].update(
                        kernel=kernel.fn.__name__,
                        signature=signature,
                        constexprs={k: repr(v) for k, v in constexprs.items()},
                    )
                if done[key] not in entry["launches"]:
                    entry["launches"].append(done[key])
        except Exception:
            entry["error"] = traceback.format_exc()
        results[case_id(module, dtype)] = entry
    out.write_text(json.dumps(results, indent=1))


# --------------------------------------------------------------------------------------------------------
# The tests.
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(work / "triton-cache"), CUDA_VISIBLE_DEVICES="")
    out = work / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "tests.kernels.test_compile_sm90", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"the compiling child failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("module, dtype", CASES, ids=[case_id(*c) for c in CASES])
def test_kernel_compiles_for_sm90(compiled, module, dtype):
    entry = compiled[case_id(module, dtype)]
    assert entry["error"] is None, f"capturing the launches failed:\n{entry['error']}"
    assert entry["launches"], f"{module} launched no kernel for {dtype}"
    for launch in entry["launches"]:
        where = f"{launch['kernel']} {launch['signature']} {launch['constexprs']}"
        assert launch["error"] is None, f"{where} does not compile for sm_{ARCH}:\n{launch['error']}"
        assert launch["ptx_target"] and launch["ptx_target"].startswith(f"sm_{ARCH}"), where
        assert launch["cubin_bytes"] > 0, where
        assert launch["shared_bytes"] <= MAX_SHARED_BYTES, where


def test_every_launch_site_has_a_case(compiled):
    """A kernel launched anywhere in kernels/ (`name[grid](...)`) must show up in the compiled launches."""
    launched_in_source = set()
    for path in KERNELS_DIR.glob("*.py"):
        launched_in_source |= set(re.findall(r"\b(\w+)\[[^\]\n]*\]\(", path.read_text()))
    compiled_kernels = {launch["kernel"] for e in compiled.values() for launch in e["launches"]}
    modules_with_cases = {module for module, _ in CASES}
    kernel_modules = {p.stem for p in KERNELS_DIR.glob("*.py") if not p.stem.startswith("_")}
    assert kernel_modules <= modules_with_cases, f"kernel modules without a case: {kernel_modules - modules_with_cases}"
    assert launched_in_source and launched_in_source <= compiled_kernels, (
        f"launched in kernels/ but never compiled here: {sorted(launched_in_source - compiled_kernels)}"
    )


if __name__ == "__main__":
    compile_all(Path(sys.argv[1]))
