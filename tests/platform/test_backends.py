"""Optional backends are detected, never required; the PyPI `apex` impostor is not NVIDIA apex."""

import sys

import pytest

from sail_megatron.platform import backends


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
