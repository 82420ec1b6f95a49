"""Every rank of a job trains the same recipe with the same code.

Each node of a multi-node job resolves the recipe from its own command line and its own checkout, so two
nodes launched with different overrides (or code) would train different models against each other and
hang when one finishes first. Before the first step every rank compares a fingerprint of its resolved
config and of the package's source; on a mismatch every rank exits with the keys (or files) that differ.
"""

import hashlib
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch.distributed as dist

from sail_megatron.config import ConfigError
from sail_megatron.config.errors import first_and_count
from sail_megatron.config.train import TrainConfig, config_differences, dump, flat_config

_PACKAGE = Path(__file__).resolve().parents[1]  # sail_megatron/
_SHOWN = 12


def _sources() -> Dict[str, str]:
    """relative path -> sha256 of every Python source of the package."""
    import sail_megatron.kernels

    roots = [_PACKAGE, *(Path(p) for p in sail_megatron.kernels.__path__)]  # a checkout's kernels/ sits beside
    files = sorted({p for root in roots for p in root.rglob("*.py") if "__pycache__" not in p.parts})
    return {str(p.relative_to(_PACKAGE.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _fingerprint(cfg: TrainConfig, sources: Dict[str, str]) -> Tuple[str, str]:
    config = hashlib.sha256(dump(cfg).encode()).hexdigest()
    code = hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(sources.items())).encode()).hexdigest()
    return config, code


def check_ranks_agree(cfg: TrainConfig) -> None:
    """Collective over all ranks; raises ConfigError on every rank when any two ranks differ."""
    sources = _sources()
    mine = _fingerprint(cfg, sources)
    everyone: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if all(f == everyone[0] for f in everyone):
        return
    # Rare: now the details, from the first rank that differs from rank 0.
    details: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(details, (flat_config(cfg), sources))
    other = next(r for r, f in enumerate(everyone) if f != everyone[0])
    (config0, sources0), (config1, sources1) = details[0], details[other]
    differ = config_differences(config0, config1)
    files = sorted(k for k in set(sources0) | set(sources1) if sources0.get(k) != sources1.get(k))
    what = [f"config {d}" for d in differ] + [f"source {f}" for f in files]
    raise ConfigError(
        "launch",
        f"rank {other} runs another recipe or code than rank 0 (rank 0 -> rank {other}): "
        + "; ".join(first_and_count(what, _SHOWN)),
        "launch every node with the same command line, recipe and checkout",
    )
