"""sail-megatron: a megatron-core trainer for SAIL-VL style vision-language models."""

import ast
import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent


def _te_version_range() -> str:
    """TE_VERSION_RANGE from sail_megatron/platform/backends.py, read without importing the package."""
    source = (ROOT / "sail_megatron" / "platform" / "backends.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["TE_VERSION_RANGE"]:
            return ast.literal_eval(node.value)
    raise RuntimeError("TE_VERSION_RANGE not found in sail_megatron/platform/backends.py")


def _requirements(name: str) -> list:
    """The requirement lines of a requirements file, comments, blank lines and pip options (-r, -c) left out."""
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / name).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;@ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


# The one list of runtime requirements is requirements.txt: the package metadata (install_requires) is that
# file verbatim, and the Makefile's venv and CI install it (through requirements-dev.txt), so all three
# agree. requirements-dev.txt adds the tools (the `dev` extra) and the builds of the platform packages
# that requirements.txt leaves to the machine, which CI pins.
INSTALL_REQUIRES = _requirements("requirements.txt")
DEV_TOOLS = [r for r in _requirements("requirements-dev.txt") if _name(r) not in {_name(i) for i in INSTALL_REQUIRES}]


class BuildPy(build_py):
    """sail_megatron.kernels in a build gets the modules of the top-level kernels/ folder copied in.

    Not `package_dir={"sail_megatron.kernels": "kernels"}`: that needs kernels/__init__.py, which makes the
    folder the top-level package `kernels` wherever the repo root is on sys.path, shadowing Hugging Face's
    `kernels` (why, and how checkouts reach the folder: sail_megatron/kernels/__init__.py).
    """

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "sail_megatron.kernels":
            modules += [(package, p.stem, f"kernels/{p.name}") for p in sorted((ROOT / "kernels").glob("*.py"))]
        return modules


class Sdist(sdist):
    """An sdist builds like the checkout does: setup.py reads the requirements files."""

    def make_release_tree(self, base_dir, files):
        extra = [f for f in ("requirements.txt", "requirements-dev.txt") if f not in files]
        super().make_release_tree(base_dir, [*files, *extra])


setup(
    name="sail-megatron",
    version="0.1.0",
    description="High-throughput distributed trainer for SAIL-VL style VLMs on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["sail_megatron", "sail_megatron.*"]),
    cmdclass={"build_py": BuildPy, "sdist": Sdist},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # Transformer Engine: FP8 and fused layers on H100 (preinstalled in NGC containers), in the
        # range megatron-core declares.
        "te": [f"transformer-engine[pytorch]{_te_version_range()}"],
        "dev": DEV_TOOLS,
    },
    entry_points={
        "console_scripts": [
            "sail-train=sail_megatron.train:main",
            "sail-bench=sail_megatron.bench.cli:main",
            "sail-data=sail_megatron.data.cli:main",
            "sail-convert=sail_megatron.convert.cli:main",
            "sail-chat=sail_megatron.chat.cli:main",
        ],
    },
)
