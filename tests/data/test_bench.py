"""The data benchmark runs and reports every path (a smoke test: no timing is asserted)."""

import torch

from sail_megatron.data.bench import internvl_baseline, run, sample_photos
from sail_megatron.data.decode_pil import PilTileDecoder
from sail_megatron.data.tiling import plan_tiles


def test_bench_reports_all_paths():
    results = run(sample_photos()[:2], tile_size=112, max_tiles=2, repeats=1)
    assert set(results) == {"internvl_baseline", "pil", "dali_cpu"}
    for r in results.values():
        assert r["images_per_s"] > 0 and r["tiles_per_s"] >= r["images_per_s"]
    assert results["internvl_baseline"]["vs_baseline"] == 1.0


def test_baseline_computes_the_same_tiles_as_the_pil_path():
    data = sample_photos()[1]
    plan = plan_tiles(451, 300, 1, 6, 112, True)
    torch.testing.assert_close(
        internvl_baseline(data, plan, 112), PilTileDecoder()([data], [plan], 112), atol=1e-6, rtol=0
    )
