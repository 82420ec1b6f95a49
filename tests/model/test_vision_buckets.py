"""Static ViT shapes (precision.vision_tile_buckets) and the ViT's CUDA graphs (precision.vision_cuda_graphs):
the settings and their refusals, the bucketing, and that padding to a bucket changes no loss or gradient
(fp32, InternViT and AIMv2, trainable and frozen ViT, text-only micro-batches, both vision layouts at TP=2).
The graphs themselves run on a GPU only (make gpu-check, part vision-graphs)."""

from pathlib import Path

import pytest
import torch

from sail_megatron.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig
from sail_megatron.config.precision import _FP8_RECIPES, pow2_buckets
from sail_megatron.config.presets import PRESETS
from sail_megatron.config.train import load_train_config
from sail_megatron.model.build import build_model, tile_runner
from sail_megatron.model.fp8_shapes import fp8_token_multiple, pad_rows
from sail_megatron.model.tile_layout import TileLayout
from sail_megatron.model.vision_buckets import BucketedTiles, DynamicTiles, pad_tiles
from sail_megatron.model.vision_graphs import GraphedTiles
from tests.helpers.multiprocess import run_on_ranks
from tests.model import bucket_workers

DEMO = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny" / "demo.yaml"
GRAPHS = dict(vision_tile_buckets="pow2", vision_cuda_graphs=True)


def _error(fn, field: str) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    assert e.value.field == field, str(e.value)
    return str(e.value)


# --- the setting -------------------------------------------------------------------------------------------


def test_pow2_ends_at_the_largest_tile_count():
    assert pow2_buckets(40) == (1, 2, 4, 8, 16, 32, 40)
    assert pow2_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert pow2_buckets(1) == (1,)
    assert PrecisionConfig(vision_tile_buckets="pow2").tile_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert PrecisionConfig(vision_tile_buckets=[4, 16, 24]).tile_buckets(24) == (4, 16, 24)
    assert PrecisionConfig().tile_buckets(24) is None


@pytest.mark.parametrize("buckets", ["pow3", [], [0, 4], [4, 2], [2, 2, 4], [2.5, 4], [True, 4]], ids=lambda b: repr(b))
def test_malformed_buckets_are_refused(buckets):
    _error(
        lambda: PrecisionConfig(vision_tile_buckets=buckets).validate(has_cuda=False, has_te=False),
        "precision.vision_tile_buckets",
    )


def test_buckets_must_reach_the_largest_micro_batch():
    message = _error(
        lambda: PrecisionConfig(vision_tile_buckets=[4, 16]).check_vision_layout(ParallelConfig(), max_tiles=24),
        "precision.vision_tile_buckets",
    )
    assert "add 24 as the largest bucket" in message
    PrecisionConfig(vision_tile_buckets=[4, 16, 32]).check_vision_layout(ParallelConfig(), max_tiles=24)
    _error(lambda: PrecisionConfig(vision_tile_buckets="pow2").tile_buckets(None), "precision.vision_tile_buckets")


def test_recipes_read_lists_and_rules():
    cfg = load_train_config(DEMO, ["precision.vision_tile_buckets=[4, 8, 24]"])
    assert cfg.precision.vision_tile_buckets == [4, 8, 24]
    cfg.precision.check_vision_layout(cfg.parallel, cfg.data.max_tiles_per_pack)
    cfg = load_train_config(DEMO, ["precision.vision_tile_buckets=pow2", "precision.vision_cuda_graphs=true"])
    assert cfg.precision.tile_buckets(cfg.data.max_tiles_per_pack)[-1] == cfg.data.max_tiles_per_pack
    # The demo recipe runs on the CPU: the graphs are refused there, by name.
    _error(lambda: cfg.validate(4, has_cuda=False, has_te=False, needs_data=False), "precision.vision_cuda_graphs")


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("recipe", _FP8_RECIPES)
def test_every_bucket_meets_the_fp8_gemm_rule(preset, recipe):
    """Buckets need no FP8 rule of their own: the tile layout pads any tile count to the token multiple."""
    cfg, multiple = PRESETS[preset], fp8_token_multiple(recipe)
    layout = TileLayout(cfg.vision.num_positions, multiple)
    for tiles in pow2_buckets(64) + (3, 5, 24, 40):
        assert layout.tokens(tiles) % multiple == 0
        assert pad_rows(torch.empty(tiles * cfg.tokens_per_tile, 0), multiple).shape[0] % multiple == 0


# --- the CUDA graphs' refusals -----------------------------------------------------------------------------


def test_graphs_need_buckets_and_a_gpu():
    _error(
        lambda: PrecisionConfig(vision_cuda_graphs=True).validate(has_cuda=True, has_te=True),
        "precision.vision_cuda_graphs",
    )
    message = _error(
        lambda: PrecisionConfig(**GRAPHS).validate(has_cuda=False, has_te=False), "precision.vision_cuda_graphs"
    )
    assert "CUDA GPU" in message
    PrecisionConfig(**GRAPHS).validate(has_cuda=True, has_te=True)


def test_graphs_refuse_fp8_in_the_vit():
    fp8 = PrecisionConfig(dtype="bf16", fp8="hybrid", fp8_vision=True, **GRAPHS)
    assert "fp8_vision" in _error(lambda: fp8.validate(has_cuda=True, has_te=True), "precision.vision_cuda_graphs")
    PrecisionConfig(dtype="bf16", fp8="hybrid", **GRAPHS).validate(has_cuda=True, has_te=True)  # FP8 in the LM only


@pytest.mark.parametrize(
    "parallel,trains,fix",
    [
        (ParallelConfig(tensor_model_parallel_size=2), True, "vision_parallel=data"),
        (ParallelConfig(pipeline_model_parallel_size=2), True, "pipeline_model_parallel_size=1"),
        (ParallelConfig(recompute_vision=True), True, "recompute_vision"),
        (ParallelConfig(overlap_param_gather=True), True, "overlap_param_gather"),
    ],
    ids=["vit-tensor-parallel", "pipeline", "recompute-vision", "overlap-param-gather"],
)
def test_graphs_refuse_what_a_graph_cannot_hold(parallel, trains, fix):
    message = _error(
        lambda: PrecisionConfig(**GRAPHS).check_vision_layout(parallel, 24, vision_trains=trains),
        "precision.vision_cuda_graphs",
    )
    assert fix in message


def test_graphs_accept_a_whole_vit_and_a_frozen_one_under_param_gather():
    graphs = PrecisionConfig(**GRAPHS)
    graphs.check_vision_layout(ParallelConfig(tensor_model_parallel_size=2, vision_parallel="data"), 24, True)
    graphs.check_vision_layout(ParallelConfig(overlap_param_gather=True), 24, vision_trains=False)


def test_building_a_graphed_model_on_the_cpu_is_refused():
    model = ModelConfig()
    model.image_context_token_id = 3
    _error(
        lambda: build_model(model, ParallelConfig(), PrecisionConfig(dtype="fp32", **GRAPHS), max_tiles=8),
        "precision.vision_cuda_graphs",
    )


# --- the runners -------------------------------------------------------------------------------------------


def test_the_runner_is_chosen_from_the_config():
    assert type(tile_runner(PrecisionConfig())) is DynamicTiles
    bucketed = tile_runner(PrecisionConfig(vision_tile_buckets="pow2"), 24)
    assert type(bucketed) is BucketedTiles and bucketed.buckets == (1, 2, 4, 8, 16, 24)
    graphed = tile_runner(PrecisionConfig(vision_tile_buckets=[8, 24], vision_cuda_graphs=True), 24)
    assert type(graphed) is GraphedTiles and graphed.buckets == (8, 24)


def test_each_tile_count_goes_to_the_smallest_bucket_that_holds_it():
    runner = BucketedTiles((2, 5, 8))
    assert [runner.bucket(t) for t in range(1, 9)] == [2, 2, 5, 5, 5, 8, 8, 8]
    with pytest.raises(ValueError, match="exceed the largest tile bucket"):
        runner.bucket(9)
    x = torch.randn(3, 3, 4, 4)
    padded = pad_tiles(x, 5)
    assert padded.shape == (5, 3, 4, 4) and torch.equal(padded[:3], x) and not padded[3:].any()


class _Recorder(torch.nn.Module):
    """A per-tile 'ViT' that records the batch sizes it is called with."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return x.flatten(1) * self.scale


@pytest.mark.parametrize("runner", [BucketedTiles((2, 5, 8)), GraphedTiles((2, 5, 8))], ids=["bucketed", "graphed"])
def test_padded_calls_return_the_real_tiles_only(runner):
    """On the CPU the graphed runner runs eagerly at the bucket shapes (graphs need CUDA tensors)."""
    vit = _Recorder()
    x = torch.randn(3, 3, 2, 2)
    out = runner(vit, x)
    out.sum().backward()
    assert vit.calls == [5] and out.shape == (3, 12)
    assert torch.allclose(out, x.flatten(1) * 2.0)
    assert torch.allclose(vit.scale.grad, x.sum())  # the blank tiles add nothing
    vit.eval()
    runner(vit, x[:1])
    assert vit.calls == [5, 2]


# --- padding changes no result -----------------------------------------------------------------------------


def _check_equal(results):
    for case, r in results.items():
        assert r["same_grad_names"], case
        assert r["loss_diff"] < 1e-6, (case, r["loss_diff"])
        assert r["grad_diff"] < 1e-5, (case, r["grad_diff"])
        assert r["bucketed_calls"] == r["expected_calls"], case
        assert set(r["bucketed_calls"]) <= set(bucket_workers.BUCKETS), case
        assert r["projector_grads"] > 0, case
        if case.endswith("trainable"):
            assert r["vision_grads"] > 0 and r["vision_grad_norm"] > 0, case
        else:
            assert r["vision_grads"] == 0, case


def test_padding_changes_no_loss_or_gradient_on_one_rank():
    (results,) = run_on_ranks(bucket_workers.single_rank, 1, ["tiny", "tiny-aimv2"])
    assert len(results) == 4
    _check_equal(results)
    # The calls that were padded: every micro-batch here, the text-only one's blank tile included.
    calls = results["tiny trainable"]
    assert calls["eager_calls"][-1] == 1 and calls["bucketed_calls"][-1] == bucket_workers.BUCKETS[0]
    assert any(e != b for e, b in zip(calls["eager_calls"], calls["bucketed_calls"]))


@pytest.mark.parametrize("layout", ["tensor", "data"])
def test_padding_changes_no_loss_or_gradient_at_tp2(layout):
    """Under "data" each rank pads its own share of the images (a rank without images runs the blank tile)."""
    results = run_on_ranks(bucket_workers.two_ranks, 2, layout)
    for rank, r in enumerate(results):
        _check_equal({f"rank {rank} {k}": v for k, v in r.items()})
    if layout == "data":  # the ranks encode different shares
        assert results[0]["trainable"]["eager_calls"] != results[1]["trainable"]["eager_calls"]
    else:
        assert results[0]["trainable"]["eager_calls"] == results[1]["trainable"]["eager_calls"]


def test_vit_call_tiles_counts_the_blank_tile_and_the_bucket():
    from sail_megatron.model.vision_buckets import vit_call_tiles

    assert [vit_call_tiles(None, n) for n in (0, 1, 7)] == [1, 1, 7]  # text-only: the blank tile
    assert [vit_call_tiles((1, 2, 4, 8, 24), n) for n in (0, 1, 3, 5, 9, 24)] == [1, 1, 4, 8, 24, 24]
    with pytest.raises(ValueError, match="max_tiles_per_pack"):
        vit_call_tiles((1, 2, 4), 5)
