"""Checkpoints: exact resume, atomic writes, the latest pointer, resharding across layouts."""

import torch

from sail_megatron.training.checkpoint_files import resolve_checkpoint_folder
from tests.helpers.multiprocess import run_on_ranks
from tests.parallel import workers


def test_unfinished_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    run_on_ranks(workers.train_with_checkpoint, 1, 2, 2, None, str(tmp_path))
    # A kill during the next save leaves only a .tmp folder behind; the pointer still names iter 2.
    (tmp_path / "iter_00000003.tmp").mkdir()
    (tmp_path / "iter_00000003.tmp" / "partial.distcp").write_bytes(b"\0" * 10)
    assert resolve_checkpoint_folder(tmp_path).name == "iter_00000002"
    (out,) = run_on_ranks(workers.train_with_checkpoint, 1, 3, None, str(tmp_path), str(tmp_path))
    assert len(out["losses"]) == 1


def test_checkpoint_from_tp2_loads_at_pp2(tmp_path):
    # Saved at TP=2 after one step; loaded (model and optimizer) at PP=2, where no step runs.
    run_on_ranks(workers.train_with_checkpoint, 2, 1, 1, None, str(tmp_path), 2, 1)
    moved = run_on_ranks(workers.train_with_checkpoint, 2, 1, None, str(tmp_path), str(tmp_path / "x"), 1, 2)
    (full,) = run_on_ranks(workers.read_training_checkpoint_model, 1, str(tmp_path / "iter_00000001"))
    first_stage = moved[0]["final"]  # vision encoder, projector and the first half of the LM layers
    assert any(n.startswith("vision_model.") for n in first_stage)
    for name, w in first_stage.items():
        assert torch.equal(w, full[name]), name
