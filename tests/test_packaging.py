"""What `pip install .` gives a user is enough to run the package: every third-party module the package
imports is declared, the installed metadata declares exactly requirements.txt (the one list the Makefile's
venv and CI install too), the console scripts resolve, and the top-level kernels/ folder reaches users as
`sail_megatron.kernels` only: never as a top-level `kernels` that would hide Hugging Face's `kernels`
(which transformers imports), from the repo root, from an editable install or from a wheel."""

import ast
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Imported only when present, on GPU clusters (NGC containers ship them); never declared.
OPTIONAL = {"transformer_engine", "apex", "amp_C", "fused_weight_gradient_mlp_cuda", "flash_attn", "pynvml"}
# The GPU check runs from a checkout and imports the kernel benchmarks' shared harness from there.
REPO_LOCAL = {"harness"}
# requirements.txt leaves these to the machine (GPU containers ship their own builds); CI pins them in
# requirements-dev.txt.
PLATFORM = {"torch", "triton", "nvidia-dali-cuda120"}
KERNEL_MODULES = sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__")


def _setup_call() -> ast.Call:
    tree = ast.parse((ROOT / "setup.py").read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")


def _requirements(name: str) -> list:
    """The requirements of a requirements file (pip options such as -r left out), parsed."""
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / name).read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def _key(req: Requirement) -> tuple:
    return canonicalize_name(req.name), str(req.specifier), tuple(sorted(req.extras)), str(req.marker or "")


def _declared() -> set:
    return {canonicalize_name(r.name) for r in _requirements("requirements.txt")}


def _imported_top_level_modules() -> set:
    found = set()
    for folder in ("sail_megatron", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"sail_megatron", "kernels", "__future__"}


def test_every_imported_package_is_declared():
    providers = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for module in sorted(_imported_top_level_modules() - OPTIONAL - REPO_LOCAL):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists, f"{module} is imported but no installed distribution provides it"
        if not dists & declared:
            missing.append(f"{module} (from {sorted(dists)})")
    assert not missing, f"imported by the package but not in requirements.txt: {missing}"


def test_console_scripts_point_at_real_functions():
    scripts = next(k.value for k in _setup_call().keywords if k.arg == "entry_points")
    for entry in ast.literal_eval(scripts)["console_scripts"]:
        name, target = (s.strip() for s in entry.split("="))
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


# ---------------------------------------------------------------------------------------------------------
# One list of requirements


def test_installed_metadata_requires_exactly_requirements_txt():
    """`pip install .` and `make venv`/CI install the same set: the metadata is requirements.txt verbatim."""
    # The venv's install, not a sail_megatron.egg-info that a build left in the checkout (the root is on
    # sys.path here, and importlib.metadata would read that one first).
    path = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    dist = next(iter(importlib.metadata.distributions(name="sail-megatron", path=path)), None)
    assert dist is not None, "sail-megatron is not installed: `make venv` (or pip install -e .) first"
    installed = [Requirement(r) for r in dist.requires or []]
    runtime = sorted(_key(r) for r in installed if not r.marker or "extra" not in str(r.marker))
    want = sorted(_key(r) for r in _requirements("requirements.txt"))
    assert runtime == want, (
        "the installed sail-megatron declares other requirements than requirements.txt "
        "(stale install? `make venv` reinstalls it)"
    )
    dev = sorted(_key(Requirement(str(r).split(";")[0])) for r in installed if 'extra == "dev"' in str(r.marker))
    tools = [r for r in _requirements("requirements-dev.txt") if canonicalize_name(r.name) not in _declared()]
    assert dev == sorted(_key(r) for r in tools), "the dev extra is the tools of requirements-dev.txt"


def test_ci_installs_one_version_of_each_requirement_inside_its_range():
    """Every requirement is pinned, in requirements.txt or (platform builds) in requirements-dev.txt, and the
    pins CI adds lie inside requirements.txt's ranges: CI tests what the metadata allows."""
    runtime = {canonicalize_name(r.name): r for r in _requirements("requirements.txt")}
    dev = {canonicalize_name(r.name): r for r in _requirements("requirements-dev.txt")}
    for name, req in runtime.items():
        pin = req if name not in dev else dev[name]
        specs = list(pin.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"CI installs no single version of {name}: {pin}"
        assert req.specifier.contains(specs[0].version, prereleases=True), f"{pin} is outside requirements.txt's {req}"
        assert (name in PLATFORM) == (name in dev), (
            f"{name}: only {sorted(PLATFORM)} are pinned in requirements-dev.txt"
        )
    transformers = runtime["transformers"]
    assert str(transformers.specifier).startswith("=="), "transformers: only the version CI tests (5.25 broke us)"


# ---------------------------------------------------------------------------------------------------------
# kernels/ is sail_megatron.kernels, and never the top-level package `kernels`

_PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, json, sys
    first, load, modules = sys.argv[1], sys.argv[2] == "import", sys.argv[3:]
    out = {}
    if first == "kernels":
        import kernels
        out["kernels"] = getattr(kernels, "CUDAProperties", None)
    import sail_megatron.kernels as pkg
    names = ["sail_megatron.kernels." + m for m in modules]
    # Where each kernel module comes from; importing them (torch, triton: seconds) only where asked.
    files = [importlib.import_module(n).__file__ if load else importlib.util.find_spec(n).origin for n in names]
    import kernels
    out.update(
        kernels_after=getattr(kernels, "CUDAProperties", None),
        kernels_file=getattr(kernels, "__file__", None),
        path=list(pkg.__path__),
        files=files,
    )
    print(json.dumps(out))
    """
)


def _stand_in_kernels(site: Path) -> None:
    """A distribution named `kernels` (as Hugging Face's), with traps where our kernel modules are named."""
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text('CUDAProperties = "stand-in"\n')
    for module in KERNEL_MODULES:
        (site / "kernels" / f"{module}.py").write_text('raise ImportError("the stand-in kernels distribution")\n')
    dist_info = site / "kernels-0.19.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")


def _probe(cwd: Path, pythonpath: list, first: str, load: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "TRITON_INTERPRET": "1"}
    argv = [sys.executable, "-c", _PROBE, first, "import" if load else "spec", *KERNEL_MODULES]
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_folder_is_not_a_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder the top-level package `kernels` wherever the repo root is on "
        "sys.path, hiding Hugging Face's `kernels` (sail_megatron/kernels/__init__.py)"
    )


@pytest.mark.parametrize("first", ["kernels", "sail_megatron.kernels"])
@pytest.mark.parametrize("where", ["repo root first on sys.path", "installed, run elsewhere"])
def test_a_kernels_distribution_is_never_shadowed(tmp_path, where, first):
    """As pytest, `python -m ...` from the root and the benchmarks (root put first) run: the other `kernels`
    wins; our modules still import as sail_megatron.kernels, from the checkout's kernels/ folder."""
    site = tmp_path / "site"
    _stand_in_kernels(site)
    if where.startswith("repo root"):
        got = _probe(ROOT, [ROOT, site], first)
    else:  # the venv's own install of sail-megatron (editable in `make venv`)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        got = _probe(elsewhere, [site], first)
    assert got.get("kernels", "stand-in") == "stand-in" and got["kernels_after"] == "stand-in", got
    assert Path(got["kernels_file"]).parent == site / "kernels"
    assert all(Path(p) != site / "kernels" for p in got["path"]), got["path"]
    if where.startswith("repo root"):
        assert {str(Path(f).parent) for f in got["files"]} == {str(ROOT / "kernels")}, got["files"]


def test_wheel_carries_the_kernels_inside_sail_megatron(tmp_path):
    """`pip wheel .`: sail_megatron/kernels holds every kernel module, there is no top-level kernels/, and
    installed beside another `kernels` (as in site-packages) both import, each from its own place."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("sail_megatron", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    for name in ("setup.py", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", wheels, src]
    done = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = wheels.glob("sail_megatron-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        site = tmp_path / "site"
        _stand_in_kernels(site)
        zf.extractall(site)  # a pure-Python wheel unpacked is its install
    assert not [n for n in names if n.startswith("kernels/")], "the wheel must not install a top-level kernels"
    inside = {n.rsplit("/", 1)[1][:-3] for n in names if n.startswith("sail_megatron/kernels/") and n.endswith(".py")}
    assert inside == {"__init__", *KERNEL_MODULES}, sorted(inside)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = _probe(elsewhere, [site], "kernels", load=True)
    assert got["kernels"] == got["kernels_after"] == "stand-in", got
    assert got["path"] == [str(site / "sail_megatron" / "kernels")], got["path"]
    assert {str(Path(f).parent) for f in got["files"]} == {str(site / "sail_megatron" / "kernels")}, got["files"]
