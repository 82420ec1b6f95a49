"""Optional backends are detected, never required; the PyPI `apex` impostor is not NVIDIA apex."""

import importlib.metadata
import logging
import os
import runpy
import sys
from pathlib import Path

import pytest
import setuptools
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from sail_megatron.platform import backends

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_detection():
    backends.detect_backends.cache_clear()
    yield
    backends.detect_backends.cache_clear()


def test_absent_backends_fall_back_to_local_layers(fresh_detection):
    b = backends.detect_backends()
    if not b.cuda:
        assert b.layer_backend == "local"
        assert "device=cpu layers=local" in b.describe()


def test_apex_without_its_cuda_extension_is_not_apex(fresh_detection, tmp_path, monkeypatch):
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("apex", None)
    assert backends._importable("apex")
    assert not backends.detect_backends().apex, "the PyPI package named apex has no amp_C extension"


def test_te_layers_need_cuda():
    assert backends.Backends(cuda=False, transformer_engine=True, apex=False).layer_backend == "local"
    assert backends.Backends(cuda=True, transformer_engine=True, apex=True).layer_backend == "te"
    assert backends.Backends(cuda=True, transformer_engine=False, apex=False).layer_backend == "local"


def test_capability_is_detected_with_cuda(fresh_detection):
    b = backends.detect_backends()
    if b.cuda:
        assert b.cuda_capability == tuple(torch.cuda.get_device_capability()) and len(b.cuda_capability) == 2
    else:
        assert b.cuda_capability is None
    hopper = backends.Backends(cuda=True, transformer_engine=True, apex=False, cuda_capability=(9, 0))
    assert hopper.cuda_capability == (9, 0)


@pytest.mark.parametrize(
    "version, fits",
    [
        ("2.9.0", True),
        ("2.9.0a0", True),
        ("2.10.0+70f5366", True),
        ("2.11.0", True),
        ("2.11.0.dev0+abc", True),
        ("2.8.0", False),
        ("2.12.0", False),
        ("2.12.0.dev0", False),
        ("1.13.0", False),
        (None, True),
    ],
)
def test_te_version_against_megatron_core(version, fits):
    problem = backends.te_version_problem(version)
    assert (problem is None) == fits
    if not fits:
        assert version in problem and backends.TE_VERSION_RANGE in problem and "sail-megatron[te]" in problem


def test_the_backends_line_warns_about_an_unfit_te(monkeypatch, caplog):
    old_te = backends.Backends(
        cuda=True, transformer_engine=True, apex=False, cuda_capability=(9, 0), transformer_engine_version="2.5.0"
    )
    monkeypatch.setattr(backends, "detect_backends", lambda: old_te)
    monkeypatch.setattr(backends, "_logged", False)
    with caplog.at_level(logging.INFO, logger=backends.logger.name):
        assert backends.log_backends_once() is old_te
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "transformer-engine 2.5.0" in warnings[0]


def test_te_range_is_megatron_cores_and_setup_pins_it(monkeypatch):
    # megatron-core's own requirement on TE (declared under its dev extra).
    te_reqs = [Requirement(r) for r in importlib.metadata.requires("megatron-core") or []]
    te_reqs = [r for r in te_reqs if r.name == "transformer-engine"]
    assert te_reqs and all(r.specifier == SpecifierSet(backends.TE_VERSION_RANGE) for r in te_reqs)
    # setup.py's `te` extra, read by running setup.py with setuptools.setup captured.
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    runpy.run_path(str(ROOT / "setup.py"))
    (te,) = captured["extras_require"]["te"]
    assert Requirement(te).name == "transformer-engine"
    assert Requirement(te).specifier == SpecifierSet(backends.TE_VERSION_RANGE)


def test_cuda_environment_is_settled_before_cuda_is_first_touched(monkeypatch):
    from sail_megatron.platform import backends

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    backends.detect_backends.cache_clear()
    try:
        backends.detect_backends()
        assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    finally:
        backends.detect_backends.cache_clear()
