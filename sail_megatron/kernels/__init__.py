"""Triton kernels; each kernel file keeps its PyTorch reference beside it.

The kernel modules live in the checkout's top-level kernels/ folder, and this package is their only name.
That folder has no __init__.py on purpose: with one, whatever runs with the repo root on sys.path (pytest,
`python -m ...` from the root, the benchmarks that put the root first) imports it as the top-level package
`kernels` and so hides Hugging Face's `kernels` distribution, which transformers >= 5.25 imports
(`cannot import name 'CUDAProperties' from 'kernels'`). A folder without __init__.py is at most a namespace
portion, and any installed regular package of that name wins over it. In a checkout (editable installs,
tests from the root) this package's __path__ reaches that folder; a wheel carries the modules in here
(setup.py's build_py copies them), so nothing is added and nothing outside the package is ever searched.
"""

from pathlib import Path

_here = Path(__file__).parent
_checkout = _here.parents[1]
if not (_here / "_common.py").is_file() and (_checkout / "setup.py").is_file():
    __path__.append(str(_checkout / "kernels"))
