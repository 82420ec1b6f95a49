"""parallel.vision_parallel: the vision encoder split over the tensor-parallel ranks ("tensor") or whole
on each of them, every rank encoding its own share of a micro-batch's images ("data"). Same losses, the
same checkpoints, and each image encoded once per model replica."""

import pytest

from sail_megatron.data.vision_share import VisionShare, assign_images
from tests.helpers.multiprocess import run_on_ranks
from tests.parallel import vision_workers

STEPS = 6
CASES = {
    # preset, trainable parts, TP, PP
    "internvit-all-tp2": ("tiny", ["vision", "projector", "language"], 2, 1),
    "internvit-projector-only-tp2": ("tiny", ["projector"], 2, 1),
    "aimv2-tp2-pp2": ("tiny-aimv2", ["vision", "projector", "language"], 2, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_data_layout_trains_like_the_tensor_layout(case):
    preset, trainable, tp, pp = CASES[case]
    runs = {
        layout: run_on_ranks(vision_workers.train_losses, tp * pp, layout, preset, trainable, tp, pp, STEPS)[-1]
        for layout in ("tensor", "data")
    }
    assert runs["data"]["losses"] == pytest.approx(runs["tensor"]["losses"], rel=1e-5, abs=1e-5)
    assert runs["data"]["grad_norms"] == pytest.approx(runs["tensor"]["grad_norms"], rel=1e-4, abs=1e-6)


def test_checkpoints_move_between_the_layouts_bitwise(tmp_path):
    results = run_on_ranks(vision_workers.checkpoint_round_trip, 2, str(tmp_path))
    for r in results:
        assert r["differing"] == []
        assert r["vision_qkv_rows"] == 3 * 64  # whole on each rank under "data" (tiny ViT: hidden 64)


def test_images_are_shared_whole_and_balanced_by_tiles():
    tiles = [7, 1, 3, 3, 2, 6]
    owners = assign_images(tiles, 2)
    load = [sum(t for t, o in zip(tiles, owners) if o == r) for r in range(2)]
    assert sorted(load) == [11, 11] and assign_images(tiles, 2) == owners  # deterministic
    assert assign_images([4], 4) == (0,)  # fewer images than ranks: the others encode none
    share = VisionShare.of(tiles, 2)
    assert sorted(share.images_of(0) + share.images_of(1)) == list(range(len(tiles)))


def test_gather_order_puts_every_token_back_in_image_order():
    share = VisionShare(tiles=(2, 1, 3), owners=(1, 0, 1))
    # rank 0 holds image 1 (1 tile), rank 1 images 0 and 2 (5 tiles); 2 tokens per tile, 10 rows per rank
    order = share.gather_order(2, 2, 10)
    assert order == [10, 11, 12, 13, 0, 1, 14, 15, 16, 17, 18, 19]
