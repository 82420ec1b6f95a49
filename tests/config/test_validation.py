"""Every config check raises ConfigError naming the dotted field and giving a fix."""

from dataclasses import replace
from typing import Optional

import pytest

from sail_megatron.config import (
    ConfigError,
    FreezeConfig,
    LanguageConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    ProjectorConfig,
    VisionConfig,
)
from sail_megatron.config.train import TrainConfig
from sail_megatron.model.presets import PRESETS, get_preset


def assert_config_error(call, field: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call()
    exc = info.value
    assert exc.field == field, f"expected field {field!r}, got {exc.field!r}: {exc}"
    assert str(exc).startswith(f"{field}: ")
    assert "Fix:" in str(exc)
    return exc


def with_vision(preset: str = "sail-vl-2b", **changes) -> ModelConfig:
    cfg = get_preset(preset)
    cfg.vision = replace(cfg.vision, **changes)
    return cfg


def with_language(preset: str = "sail-vl-2b", **changes) -> ModelConfig:
    cfg = get_preset(preset)
    cfg.language = replace(cfg.language, **changes)
    return cfg


def tiny_tp4(**vision_changes) -> ModelConfig:
    """Tiny, with a language model that splits over TP=4 (4 heads, 4 groups, ffn 160, hidden 64)."""
    cfg = with_language("tiny", num_query_groups=4)
    cfg.vision = replace(cfg.vision, **vision_changes)
    return cfg


# ------------------------------------------------------------------------------------------ parallel


@pytest.mark.parametrize(
    "model,tp,pp,world,field",
    [
        # 12 language heads over TP=5
        (lambda: get_preset("sail-vl-2b"), 5, 1, 5, "model.language.num_attention_heads"),
        # 12 heads split over TP=4, but the 2 KV groups do not
        (lambda: get_preset("sail-vl-2b"), 4, 1, 4, "model.language.num_query_groups"),
        (
            lambda: with_language("tiny", num_query_groups=4, ffn_hidden_size=162),
            4,
            1,
            4,
            "model.language.ffn_hidden_size",
        ),
        # language splits over TP=4, the 2 vision heads do not
        (lambda: tiny_tp4(num_attention_heads=2), 4, 1, 4, "model.vision.num_attention_heads"),
        (lambda: tiny_tp4(ffn_hidden_size=130), 4, 1, 4, "model.vision.ffn_hidden_size"),
        # 28 language layers over PP=5
        (lambda: get_preset("sail-vl-2b"), 1, 5, 5, "parallel.pipeline_model_parallel_size"),
        # world size not a multiple of TP*PP
        (lambda: get_preset("sail-vl-2b"), 2, 1, 3, "parallel"),
        (lambda: get_preset("tiny"), 2, 2, 6, "parallel"),
        (lambda: get_preset("tiny"), 0, 1, 1, "parallel.tensor_model_parallel_size"),
        (lambda: get_preset("tiny"), 1, 0, 1, "parallel.pipeline_model_parallel_size"),
    ],
    ids=[
        "lang-heads",
        "query-groups",
        "lang-ffn",
        "vision-heads",
        "vision-ffn",
        "pp-layers",
        "world-tp",
        "world-tp-pp",
        "tp-zero",
        "pp-zero",
    ],
)
def test_parallel_layout_errors(model, tp, pp, world, field):
    cfg = model()
    cfg.validate()  # the model itself is fine; only the layout is not
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    assert_config_error(lambda: parallel.validate(cfg, world), field)


def test_sequence_parallel_needs_tp():
    parallel = ParallelConfig(tensor_model_parallel_size=1, sequence_parallel=True)
    assert_config_error(lambda: parallel.validate(get_preset("tiny"), 1), "parallel.sequence_parallel")
    ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True).validate(get_preset("tiny"), 2)


def train_config(precision: PrecisionConfig, parallel: Optional[ParallelConfig] = None) -> TrainConfig:
    """A whole recipe on the tiny preset, valid but for what the test varies."""
    parallel = parallel or ParallelConfig()
    cfg = TrainConfig(model=get_preset("tiny"), parallel=parallel, precision=precision)
    cfg.data.path, cfg.data.tokenizer = "data", "tokenizer"
    cfg.run.global_batch_size = parallel.data_parallel_size(parallel.model_parallel_size)
    cfg.run.train_steps = 10
    return cfg


def _sp_train_config(layers: str = "auto") -> TrainConfig:
    return train_config(
        PrecisionConfig(layers=layers), ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    )


def test_sequence_parallel_needs_te_layers():
    # megatron-core's local spec normalizes with WrappedTorchNorm (apex or not), which refuses SP.
    assert_config_error(
        lambda: ParallelConfig(sequence_parallel=True).check_layer_backend("local"), "parallel.sequence_parallel"
    )
    ParallelConfig(sequence_parallel=True).check_layer_backend("te")
    ParallelConfig(sequence_parallel=False).check_layer_backend("local")
    # In the recipe check: auto resolves to local without TE or without CUDA, or local is asked for.
    for has_cuda, has_te, layers in ((True, False, "auto"), (False, True, "auto"), (True, True, "local")):
        exc = assert_config_error(
            lambda: _sp_train_config(layers).validate(2, has_cuda=has_cuda, has_te=has_te), "parallel.sequence_parallel"
        )
        assert "sequence_parallel=false" in str(exc) and "Transformer Engine" in str(exc)
    _sp_train_config().validate(2, has_cuda=True, has_te=True)
    _sp_train_config("te").validate(2, has_cuda=True, has_te=True)


def test_valid_layouts():
    ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).validate(get_preset("tiny"), 4)
    ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).validate(get_preset("tiny"), 8)
    ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=4).validate(get_preset("sail-vl-2b"), 8)
    ParallelConfig(tensor_model_parallel_size=4, pipeline_model_parallel_size=2).validate(get_preset("sail-vl-8b"), 16)
    ParallelConfig().validate(get_preset("sail-vl-2b"), 3)  # DP=3


# ---------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("select_layer", [0, 25, -25])
def test_select_layer_out_of_range(select_layer):
    cfg = with_vision(select_layer=select_layer)
    assert cfg.vision.num_layers == 24
    assert_config_error(cfg.validate, "model.vision.select_layer")


@pytest.mark.parametrize("select_layer,built", [(-24, 1), (24, 24), (-1, 24), (1, 1), (-4, 21)])
def test_select_layer_in_range(select_layer, built):
    cfg = with_vision(select_layer=select_layer)
    cfg.validate()
    assert cfg.vision.num_built_layers == built


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_drop_path_rate_out_of_range(rate):
    assert_config_error(with_vision(drop_path_rate=rate).validate, "model.vision.drop_path_rate")


def test_image_size_not_multiple_of_patch():
    assert_config_error(with_vision(image_size=450).validate, "model.vision.image_size")


def test_vision_hidden_not_divisible_by_heads():
    assert_config_error(with_vision(num_attention_heads=12).validate, "model.vision.hidden_size")


@pytest.mark.parametrize("name", ["hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size"])
def test_vision_sizes_must_be_positive(name):
    assert_config_error(with_vision(**{name: 0}).validate, f"model.vision.{name}")


def test_unknown_ps_version():
    cfg = get_preset("sail-vl-2b")
    cfg.projector = ProjectorConfig(ps_version="v3")
    assert_config_error(cfg.validate, "model.projector.ps_version")


@pytest.mark.parametrize(
    "ratio,image_size",
    [
        (0.5, 14 * 7),  # a 7x7 patch grid does not split into 2x2 blocks
        (0.25, 14 * 6),  # 6x6 into 4x4
        (0.3, 448),  # not 1/k
    ],
    ids=["odd-grid", "grid-vs-quarter", "not-1-over-k"],
)
def test_downsample_ratio(ratio, image_size):
    cfg = with_vision(image_size=image_size)
    cfg.projector = ProjectorConfig(downsample_ratio=ratio)
    assert_config_error(cfg.validate, "model.projector.downsample_ratio")


def test_language_errors():
    assert_config_error(with_language(num_query_groups=5).validate, "model.language.num_query_groups")
    assert_config_error(with_language(num_attention_heads=7).validate, "model.language.hidden_size")
    assert_config_error(with_language(vocab_size=0).validate, "model.language.vocab_size")
    assert_config_error(lambda: LanguageConfig(num_layers=-1).validate(prefix="lm"), "lm.num_layers")


@pytest.mark.parametrize("token_id", [-1, 151936, 10**6])
def test_image_context_token_outside_vocab(token_id):
    cfg = get_preset("sail-vl-2b")
    cfg.image_context_token_id = token_id
    assert_config_error(cfg.validate, "model.image_context_token_id")


def test_image_context_token_inside_vocab():
    cfg = get_preset("sail-vl-2b")
    for token_id in (0, 151935):
        cfg.image_context_token_id = token_id
        cfg.validate()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name):
    get_preset(name).validate()
    ModelConfig().validate()
    VisionConfig().validate()


# ------------------------------------------------------------------------------------------ precision


def test_mixed_precision_on_the_cpu():
    # bf16/fp16 run on the CPU too (the GPU recipes' precision is trained in CI that way).
    PrecisionConfig(dtype="bf16").validate(has_cuda=False, has_te=False)
    PrecisionConfig(dtype="fp16").validate(has_cuda=False, has_te=False)


def test_unknown_dtype():
    assert_config_error(lambda: PrecisionConfig(dtype="fp64").validate(has_cuda=True, has_te=True), "precision.dtype")


def test_fp8_without_te():
    assert_config_error(
        lambda: PrecisionConfig(dtype="bf16", fp8="hybrid").validate(has_cuda=True, has_te=False), "precision.fp8"
    )
    assert_config_error(
        lambda: PrecisionConfig(dtype="bf16", fp8="e4m3").validate(has_cuda=False, has_te=True), "precision.fp8"
    )


def test_fp8_errors():
    assert_config_error(
        lambda: PrecisionConfig(dtype="bf16", fp8="e5m2").validate(has_cuda=True, has_te=True), "precision.fp8"
    )
    assert_config_error(
        lambda: PrecisionConfig(dtype="bf16", fp8="hybrid", fp8_recipe="nope").validate(has_cuda=True, has_te=True),
        "precision.fp8_recipe",
    )
    assert_config_error(
        lambda: PrecisionConfig(dtype="fp32", fp8="hybrid").validate(has_cuda=True, has_te=True), "precision.fp8"
    )


HOPPER, BLACKWELL = (9, 0), (10, 0)


def test_mxfp8_needs_blackwell():
    mxfp8 = PrecisionConfig(dtype="bf16", fp8="hybrid", fp8_recipe="mxfp8")
    exc = assert_config_error(
        lambda: mxfp8.validate(has_cuda=True, has_te=True, cuda_capability=HOPPER), "precision.fp8_recipe"
    )
    assert "9.0" in str(exc) and "delayed" in str(exc) and "tensorwise" in str(exc)
    mxfp8.validate(has_cuda=True, has_te=True, cuda_capability=BLACKWELL)
    mxfp8.validate(has_cuda=True, has_te=True, cuda_capability=(12, 0))
    mxfp8.validate(has_cuda=True, has_te=True)  # capability unknown: not checked
    for recipe in ("delayed", "tensorwise"):
        PrecisionConfig(dtype="bf16", fp8="hybrid", fp8_recipe=recipe).validate(
            has_cuda=True, has_te=True, cuda_capability=HOPPER
        )
    PrecisionConfig(dtype="bf16", fp8_recipe="mxfp8").validate(
        has_cuda=True, has_te=True, cuda_capability=HOPPER
    )  # no FP8: recipe unused


def test_mxfp8_in_the_recipe_check():
    cfg = train_config(PrecisionConfig(fp8="hybrid", fp8_recipe="mxfp8"))
    assert_config_error(
        lambda: cfg.validate(1, has_cuda=True, has_te=True, cuda_capability=HOPPER), "precision.fp8_recipe"
    )
    cfg.validate(1, has_cuda=True, has_te=True, cuda_capability=BLACKWELL)


def test_valid_precision():
    PrecisionConfig(dtype="fp32").validate(has_cuda=False, has_te=False)
    PrecisionConfig(dtype="bf16").validate(has_cuda=True, has_te=False)
    PrecisionConfig(dtype="bf16", fp8="hybrid").validate(has_cuda=True, has_te=True)
    PrecisionConfig(dtype="fp16", fp8="e4m3", fp8_recipe="tensorwise").validate(has_cuda=True, has_te=True)


# --------------------------------------------------------------------------------------------- freeze


@pytest.mark.parametrize("trainable", [["vision", "llm"], ["mlp1"], []], ids=["one-unknown", "unknown", "empty"])
def test_freeze_errors(trainable):
    assert_config_error(FreezeConfig(trainable=trainable).validate, "freeze.trainable")


@pytest.mark.parametrize("trainable", [["projector"], ["vision", "projector"], ["vision", "projector", "language"]])
def test_freeze_valid(trainable):
    FreezeConfig(trainable=trainable).validate()
    FreezeConfig().validate()


# Gaps found while writing these tests: each must be a ConfigError, never a crash later.
@pytest.mark.parametrize("field_name,value", [("patch_size", 0), ("image_size", 0), ("hidden_size", True)])
def test_vision_sizes_must_be_positive_integers(field_name, value):
    vision = VisionConfig(**{field_name: value})
    with pytest.raises(ConfigError) as e:
        vision.validate()
    assert e.value.field == f"model.vision.{field_name}"


def test_downsample_ratio_zero():
    with pytest.raises(ConfigError) as e:
        ProjectorConfig(downsample_ratio=0).validate(VisionConfig())
    assert e.value.field == "model.projector.downsample_ratio"


def test_world_size_zero():
    with pytest.raises(ConfigError) as e:
        ParallelConfig().validate(get_preset("tiny"), 0)
    assert e.value.field == "parallel"


def test_vocab_divisor_positive():
    with pytest.raises(ConfigError) as e:
        LanguageConfig(make_vocab_size_divisible_by=0).validate()
    assert e.value.field == "model.language.make_vocab_size_divisible_by"


def test_duplicate_trainable_part():
    with pytest.raises(ConfigError) as e:
        FreezeConfig(trainable=["projector", "projector"]).validate()
    assert e.value.field == "freeze.trainable"


# ------------------------------------------------------------------------------------ mixture of experts


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(num_experts=None), "model.language.num_experts"),
        (dict(num_experts=0), "model.language.num_experts"),
        (dict(moe_ffn_hidden_size=None), "model.language.moe_ffn_hidden_size"),
        (dict(moe_router_topk=True), "model.language.moe_router_topk"),
        (dict(moe_router_topk=129), "model.language.moe_router_topk"),
        (dict(moe_aux_loss_coeff=-0.1), "model.language.moe_aux_loss_coeff"),
        (dict(moe_z_loss_coeff=0.0), "model.language.moe_z_loss_coeff"),
    ],
    ids=["no-experts", "zero-experts", "no-expert-ffn", "bool-topk", "topk-over-experts", "aux-negative", "z-zero"],
)
def test_moe_language_errors(changes, field):
    exc = assert_config_error(with_language("sail-vl2-moe", **changes).validate, field)
    assert "qwen3_moe" in str(exc) or "Fix: use" in str(exc)


def test_dense_language_with_experts_is_refused():
    exc = assert_config_error(with_language("sail-vl2-8b", num_experts=8).validate, "model.language.num_experts")
    assert "arch qwen3_moe" in str(exc)


@pytest.mark.parametrize(
    "preset,parallel,world,field",
    [
        # 128 experts over 3 expert ranks
        ("sail-vl2-moe", dict(expert_model_parallel_size=3), 3, "parallel.expert_model_parallel_size"),
        # expert TP x EP x PP = 1 x 4 x 1 does not divide 6 ranks
        ("sail-vl2-moe", dict(expert_model_parallel_size=4), 6, "parallel.expert_model_parallel_size"),
        ("tiny-sail-vl2-moe", dict(expert_model_parallel_size=0), 2, "parallel.expert_model_parallel_size"),
        # expert parallelism on a dense model
        ("sail-vl2-8b", dict(expert_model_parallel_size=2), 2, "parallel.expert_model_parallel_size"),
        ("sail-vl2-8b", dict(expert_tensor_parallel_size=1), 1, "parallel.expert_tensor_parallel_size"),
        # expert FFN 48 over 5 expert-TP ranks
        ("tiny-sail-vl2-moe", dict(expert_tensor_parallel_size=5), 5, "model.language.moe_ffn_hidden_size"),
        # megatron's MoE layer trains under TP only with sequence parallelism
        ("sail-vl2-moe", dict(tensor_model_parallel_size=2), 2, "parallel.sequence_parallel"),
    ],
    ids=["experts-over-ep", "world-over-ep", "ep-zero", "ep-dense", "etp-dense", "etp-expert-ffn", "tp-needs-sp"],
)
def test_expert_parallel_errors(preset, parallel, world, field):
    cfg = get_preset(preset)
    cfg.validate()
    exc = assert_config_error(lambda: ParallelConfig(**parallel).validate(cfg, world), field)
    if parallel.get("expert_model_parallel_size") == 2:
        assert "sail-vl2-moe" in str(exc)  # the fix names a preset with experts


def test_valid_expert_layouts():
    moe = get_preset("sail-vl2-moe")
    ParallelConfig(expert_model_parallel_size=8).validate(moe, 8)  # 16 experts per rank
    ParallelConfig(expert_model_parallel_size=8).validate(moe, 64)  # DP 64, expert DP 8
    ParallelConfig(pipeline_model_parallel_size=2, expert_model_parallel_size=4).validate(moe, 8)
    sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=4)
    sp.validate(moe, 8)  # expert TP 2 x EP 4 = the world
    assert sp.expert_data_parallel_size(8) == 1 and sp.data_parallel_size(8) == 4
    ParallelConfig(
        tensor_model_parallel_size=2,
        sequence_parallel=True,
        expert_model_parallel_size=8,
        expert_tensor_parallel_size=1,
    ).validate(moe, 8)
    # The dense FFN (Qwen3-30B-A3B's unused intermediate_size) is not checked against TP for an MoE model.
    tiny = with_language("tiny-sail-vl2-moe", ffn_hidden_size=161)
    ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True).validate(tiny, 2)
