"""sail-megatron: a megatron-core trainer for SAIL-VL style vision-language models."""

import ast
from pathlib import Path

from setuptools import find_packages, setup


def _te_version_range() -> str:
    """TE_VERSION_RANGE from sail_megatron/platform/backends.py, read without importing the package."""
    source = (Path(__file__).resolve().parent / "sail_megatron" / "platform" / "backends.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["TE_VERSION_RANGE"]:
            return ast.literal_eval(node.value)
    raise RuntimeError("TE_VERSION_RANGE not found in sail_megatron/platform/backends.py")


setup(
    name="sail-megatron",
    version="0.1.0",
    description="High-throughput distributed trainer for SAIL-VL style VLMs on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["sail_megatron", "sail_megatron.*"]) + ["sail_megatron.kernels"],
    # Triton kernels live in the top-level kernels/ folder but install as sail_megatron.kernels.
    package_dir={"sail_megatron.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        # Tested: megatron-core 0.16.1 (the newest release that supports Python 3.11).
        "megatron-core>=0.16,<0.17",
        "megatron-energon>=7.0",
        "nvidia-dali-cuda120>=2.0",
        "triton>=3.0",
        "transformers>=4.50",
        "tokenizers",
        "safetensors",
        "tensorboard",
        "pyyaml",
        "numpy",
        "packaging",  # Transformer Engine's version against megatron-core's range
        "einops",
        "pillow",
        "tqdm",
        "matplotlib",  # curves.png at the end of a run, sail-bench --plot
        "scikit-image",  # its bundled photographs make the embedded demo dataset
    ],
    extras_require={
        # Transformer Engine: FP8 and fused layers on H100 (preinstalled in NGC containers), in the
        # range megatron-core declares.
        "te": [f"transformer-engine[pytorch]{_te_version_range()}"],
        "dev": ["pytest>=8"],
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
