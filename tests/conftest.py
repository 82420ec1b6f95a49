import pytest
import torch

from tests.helpers.loader_workers import stop_loader_workers, track_loader_iterators

track_loader_iterators()


@pytest.fixture(autouse=True)
def _loader_workers_stop_with_their_test():
    yield
    stop_loader_workers()


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The embedded demo dataset (`sail-data demo`: shards, a held-out split, a blend, a tokenizer), built
    once for the whole session: the tests read it and write their runs elsewhere."""
    from sail_megatron.data.cli import build_demo

    return build_demo(tmp_path_factory.mktemp("demo") / "demo_data")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
