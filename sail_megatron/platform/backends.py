"""Optional accelerated backends (Transformer Engine, NVIDIA apex): detected once, logged once."""

import functools
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

logger = logging.getLogger(__name__)

# The Transformer Engine versions megatron-core 0.16.1 declares it works with (its own requirement).
# setup.py reads this line for the `te` extra, so the range lives here only.
TE_VERSION_RANGE = ">=2.9.0a0,<2.12.0"


@dataclass(frozen=True)
class Backends:
    cuda: bool
    transformer_engine: bool
    apex: bool
    cuda_capability: Optional[Tuple[int, int]] = None
    """(major, minor) of this process's GPU; None without CUDA."""
    transformer_engine_version: Optional[str] = None
    """The installed distribution's version; None when absent or when its metadata is missing."""

    @property
    def layer_backend(self) -> str:
        """'te' when Transformer Engine layers can run, else megatron-core's 'local' layers."""
        return "te" if self.cuda and self.transformer_engine else "local"

    def describe(self) -> str:
        return (
            f"device={'cuda' if self.cuda else 'cpu'} layers={self.layer_backend} "
            f"transformer_engine={'yes' if self.transformer_engine else 'no'} "
            f"apex={'yes' if self.apex else 'no'}"
        )


def te_version_problem(version: Optional[str]) -> Optional[str]:
    """Why this Transformer Engine version does not fit megatron-core, or None (also when unknown)."""
    if version is None:
        return None
    try:
        # Pre-releases and local builds (NGC's "2.10.0+abc", "2.11.0.dev0") count as their release.
        fits = SpecifierSet(TE_VERSION_RANGE).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return f"transformer-engine version {version!r} cannot be compared with {TE_VERSION_RANGE}"
    if fits:
        return None
    return (
        f"transformer-engine {version} is outside {TE_VERSION_RANGE}, the range megatron-core 0.16 is "
        f"built for; install 'transformer-engine[pytorch]{TE_VERSION_RANGE}' (pip install 'sail-megatron[te]')"
    )


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _distribution_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


CUDA_ENVIRONMENT = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
"""Read by CUDA when a process first uses it, so set before that (unless the user set them): one hardware
queue keeps tensor-parallel communication ordered ahead of compute (megatron-core's advice)."""


@functools.lru_cache(maxsize=1)
def detect_backends() -> Backends:
    """What this process can use. Absent optional packages are never an error. The first call of every
    entry point that may touch CUDA, so CUDA's environment is settled here."""
    for name, value in CUDA_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # The PyPI package called `apex` is not NVIDIA apex: require its CUDA extension module too.
    apex = _importable("apex") and _importable("amp_C")
    cuda = torch.cuda.is_available()
    te = _importable("transformer_engine")
    return Backends(
        cuda=cuda,
        transformer_engine=te,
        apex=apex,
        cuda_capability=tuple(torch.cuda.get_device_capability()) if cuda else None,
        transformer_engine_version=_distribution_version("transformer-engine") if te else None,
    )


_logged = False


def log_backends_once() -> Backends:
    global _logged
    backends = detect_backends()
    if not _logged:
        logger.info("backends: %s", backends.describe())
        problem = te_version_problem(backends.transformer_engine_version)
        if problem:
            logger.warning("backends: %s", problem)
        _logged = True
    return backends
