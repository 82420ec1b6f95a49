"""Optional accelerated backends (Transformer Engine, NVIDIA apex): detected once, logged once."""

import functools
import importlib.util
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backends:
    cuda: bool
    transformer_engine: bool
    apex: bool

    @property
    def layer_backend(self) -> str:
        """'te' when Transformer Engine layers can run, else megatron-core's 'local' layers."""
        return "te" if self.cuda and self.transformer_engine else "local"

    def describe(self) -> str:
        return (f"device={'cuda' if self.cuda else 'cpu'} layers={self.layer_backend} "
                f"transformer_engine={'yes' if self.transformer_engine else 'no'} "
                f"apex={'yes' if self.apex else 'no'}")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def detect_backends() -> Backends:
    """What this process can use. Absent optional packages are never an error."""
    # The PyPI package called `apex` is not NVIDIA apex: require its CUDA extension module too.
    apex = _importable("apex") and _importable("amp_C")
    return Backends(cuda=torch.cuda.is_available(), transformer_engine=_importable("transformer_engine"), apex=apex)


_logged = False


def log_backends_once() -> Backends:
    global _logged
    backends = detect_backends()
    if not _logged:
        logger.info("backends: %s", backends.describe())
        _logged = True
    return backends
