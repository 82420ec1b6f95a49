import dataclasses

import pytest

from sail_megatron.data.tiling import TilePlan, choose_grid, plan_tiles


# --- Reference: InternVL's find_closest_aspect_ratio and the grid part of dynamic_preprocess, verbatim.
def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def internvl_target_ratios(min_num, max_num):
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def internvl_grid(orig_width, orig_height, min_num, max_num, image_size):
    aspect_ratio = orig_width / orig_height
    target_ratios = internvl_target_ratios(min_num, max_num)
    return find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)


# --- Sweep: a coarse grid, multiples of 224/448 (exact ratio ties), and extreme aspect ratios.
_SIDES = sorted(
    set(range(1, 5001, 97))
    | {224 * k for k in range(1, 23)}
    | {1, 2, 3, 100, 300, 400, 447, 448, 449, 500, 895, 896, 897, 1200, 1300, 4000, 5000}
)
_SIZES = [(w, h) for w in _SIDES for h in _SIDES] + [(1, 4000), (4000, 1), (1, 1), (5000, 1), (1, 5000)]


# (2, 2) and (3, 3) leave only mirrored grids, e.g. 1x2 vs 2x1: there the candidate order decides.
@pytest.mark.parametrize("min_num,max_num", [(1, 6), (1, 12), (1, 24), (2, 6), (1, 1), (2, 2), (3, 3)])
@pytest.mark.parametrize("image_size", [448, 224])
def test_matches_internvl_sweep(min_num, max_num, image_size):
    ratios = internvl_target_ratios(min_num, max_num)  # hoisted: the reference rebuilds it per image
    mismatches = []
    for w, h in _SIZES:
        want = find_closest_aspect_ratio(w / h, ratios, w, h, image_size)
        got = choose_grid(w, h, min_num, max_num, image_size)
        if got != want:
            mismatches.append(((w, h), got, want))
    assert not mismatches, mismatches[:10]


@pytest.mark.parametrize(
    "size,min_num,max_num,expected",
    [
        ((448, 448), 1, 6, (1, 1)),  # square: (2,2) ties but the image is too small for it
        ((896, 896), 1, 6, (2, 2)),  # square tie, big enough for 2x2
        ((1000, 1000), 1, 12, (3, 3)),  # 1e6 > 0.5 * 448^2 * 9
        ((896, 448), 1, 6, (2, 1)),
        ((448, 896), 1, 6, (1, 2)),
        ((1, 4000), 1, 6, (1, 6)),
        ((4000, 1), 1, 6, (6, 1)),
        ((448, 448), 2, 6, (2, 2)),  # min 2 rules out 1x1
        ((4000, 1), 1, 1, (1, 1)),
        ((500, 400), 2, 2, (1, 2)),  # 1x2 and 2x1 tie exactly; set order puts 1x2 first and it stays
    ],
)
def test_hand_checked(size, min_num, max_num, expected):
    assert choose_grid(*size, min_num, max_num, 448) == expected
    assert internvl_grid(*size, min_num, max_num, 448) == expected


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(width=0, height=10), "width"),
        (dict(width=10, height=-1), "height"),
        (dict(width=10, height=10, tile_size=0), "tile_size"),
        (dict(width=10, height=10, min_tiles=0), "min_tiles"),
        (dict(width=10, height=10, min_tiles=3, max_tiles=2), "max_tiles"),
    ],
)
def test_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        choose_grid(**kwargs)


def test_plan_tiles_thumbnail_rule():
    one = plan_tiles(448, 448, 1, 6, 448, use_thumbnail=True)
    assert one == TilePlan(1, 1, thumbnail=False) and one.num_tiles == 1  # no thumbnail of a lone tile
    wide = plan_tiles(896, 448, 1, 6, 448, use_thumbnail=True)
    assert wide == TilePlan(2, 1, thumbnail=True) and wide.num_tiles == 3
    plain = plan_tiles(896, 448, 1, 6, 448, use_thumbnail=False)
    assert plain == TilePlan(2, 1, thumbnail=False) and plain.num_tiles == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        wide.cols = 3  # type: ignore[misc]
