import pytest

from tests.convert import fixtures as F
from tests.convert import workers
from tests.helpers.multiprocess import run_on_ranks


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """One tiny model three ways, made once for the error tests: `hf` (an InternVL-chat folder), `mcore`
    (its sail-convert checkpoint: `latest` + iter_00000000) and `run` (a trainer run folder with config.yaml).
    Tests damage copies, never these."""
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    F.write_chat_checkpoint(root / "hf", F.build_modules(F.Spec(seed=7)))
    jobs = [
        dict(op="hf_to_mcore", hf_dir=str(root / "hf"), out_dir=str(root / "mcore")),
        dict(op="as_trainer_run", ckpt=str(root / "mcore"), run_dir=str(root / "run")),
    ]
    (results,) = run_on_ranks(workers.convert_many, 1, jobs)
    assert all(r["ok"] for r in results), results
    return root
