import os
import time

import pytest

from sail_megatron.training.watchdog import HANGS_DIR, StepWatchdog, dump_grace_s


def test_the_limit_is_the_timeout_until_enough_steps_give_a_median():
    dog = StepWatchdog("/nonexistent", rank=0, world_size=2, timeout_s=100.0, factor=3.0)
    assert dog.limit() == 100.0
    dog.recent.extend([2.0, 2.0, 9.0, 2.0, 2.0])
    assert dog.limit() == pytest.approx(6.0)  # 3 x the median; the one slow step does not move it
    with dog.long_phase():
        assert dog.limit() == 100.0  # a checkpoint save is held to the timeout alone
    assert StepWatchdog("/nonexistent", 0, 1, None).limit() is None


def test_the_grace_for_peer_dumps_is_a_fifth_of_the_limit_within_bounds():
    assert dump_grace_s(1.0) == 2.0 and dump_grace_s(50.0) == 10.0 and dump_grace_s(3600.0) == 30.0


def _dump(folder, rank, age_s=0.0):
    path = folder / f"rank_{rank}.txt"
    path.write_text("stacks")
    when = time.time() - age_s
    os.utime(path, (when, when))


def test_a_rank_that_fired_waits_for_every_peers_dump_of_this_hang(tmp_path):
    folder = tmp_path / HANGS_DIR
    folder.mkdir()
    dog = StepWatchdog(tmp_path, rank=0, world_size=3, timeout_s=10.0)
    step_began = time.time() - 10.0
    _dump(folder, 0)
    _dump(folder, 1)
    _dump(folder, 2, age_s=3600.0)  # rank 2's dump of an earlier hang does not count
    began = time.monotonic()
    assert dog.wait_for_peer_dumps(step_began, grace_s=0.5) == 2
    assert time.monotonic() - began >= 0.5  # waited out the grace for rank 2

    _dump(folder, 2)
    began = time.monotonic()
    assert dog.wait_for_peer_dumps(step_began, grace_s=30.0) == 3
    assert time.monotonic() - began < 5.0  # all there: no waiting
