"""What `pip install .` gives a user is enough to run the package: every third-party module the package
imports is declared in setup.py (optional accelerators excepted), and the console scripts resolve."""

import ast
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Imported only when present, on GPU clusters (NGC containers ship them); never declared.
OPTIONAL = {"transformer_engine", "apex", "amp_C", "fused_weight_gradient_mlp_cuda", "flash_attn", "pynvml"}
# The GPU check runs from a checkout and imports the kernel benchmarks' shared harness from there.
REPO_LOCAL = {"harness"}


def _setup_call() -> ast.Call:
    tree = ast.parse((ROOT / "setup.py").read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")


def _declared() -> set:
    requires = next(k.value for k in _setup_call().keywords if k.arg == "install_requires")
    names = {re.split(r"[<>=!\[; ]", ast.literal_eval(e))[0] for e in requires.elts}
    return {n.lower().replace("_", "-") for n in names}


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
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        assert dists, f"{module} is imported but no installed distribution provides it"
        if not dists & declared:
            missing.append(f"{module} (from {sorted(dists)})")
    assert not missing, f"imported by the package but not in setup.py install_requires: {missing}"


def test_console_scripts_point_at_real_functions():
    scripts = next(k.value for k in _setup_call().keywords if k.arg == "entry_points")
    for entry in ast.literal_eval(scripts)["console_scripts"]:
        name, target = (s.strip() for s in entry.split("="))
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
