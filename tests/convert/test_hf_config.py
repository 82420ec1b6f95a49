"""config.json (InternVL-chat) <-> ModelConfig: fields, exact round trip, every problem reported."""

import copy

import pytest

from sail_megatron.convert.errors import ConversionError
from sail_megatron.convert.hf_config import hf_config_from_model, model_config_from_hf
from tests.convert import fixtures as F


@pytest.fixture(scope="module")
def config():
    spec = F.Spec(tied=True, select_layer=-2, ps_version="v1")
    return F.chat_config(spec, F.build_modules(spec).qwen)


def test_reads_every_field(config):
    cfg = model_config_from_hf(config, make_vocab_size_divisible_by=64)
    v, p, lang = cfg.vision, cfg.projector, cfg.language
    assert (v.hidden_size, v.num_layers, v.num_attention_heads, v.ffn_hidden_size) == (32, 3, 4, 64)
    assert (v.image_size, v.patch_size, v.select_layer, v.num_built_layers) == (56, 14, -2, 2)
    assert (v.drop_path_rate, v.layer_scale_init, v.layernorm_epsilon) == (0.1, 0.1, 1e-6)
    assert (p.downsample_ratio, p.ps_version) == (0.5, "v1")
    assert (lang.hidden_size, lang.num_layers, lang.num_attention_heads, lang.num_query_groups) == (64, 2, 4, 2)
    assert (lang.ffn_hidden_size, lang.vocab_size, lang.rope_theta, lang.tie_word_embeddings) == (96, 300, 1e6, True)
    assert lang.make_vocab_size_divisible_by == 64


def test_round_trip_is_identical(config):
    assert hf_config_from_model(model_config_from_hf(config), config) == config
    # transformers-4 style: integer rope_theta at the top of llm_config stays an int.
    old = copy.deepcopy(config)
    old["llm_config"].pop("rope_parameters")
    old["llm_config"]["rope_theta"] = 1000000
    back = hf_config_from_model(model_config_from_hf(old), old)
    assert back == old and isinstance(back["llm_config"]["rope_theta"], int)


def test_changed_fields_are_written(config):
    cfg = model_config_from_hf(config)
    cfg.vision.select_layer = -1
    cfg.language.vocab_size = 320
    out = hf_config_from_model(cfg, config, dtype="bf16")
    assert out["select_layer"] == -1 and out["llm_config"]["vocab_size"] == 320
    assert out["torch_dtype"] == "bfloat16"
    assert config["select_layer"] == -2, "the template is not modified"


def test_unknown_model_type(config):
    bad = dict(config, model_type="llava")
    with pytest.raises(ConversionError, match="model_type is 'llava', expected 'internvl_chat'"):
        model_config_from_hf(bad)


def test_every_unsupported_feature_is_listed(config):
    bad = copy.deepcopy(config)
    bad["vision_config"].update(qk_normalization=True, norm_type="rms_norm")
    bad["llm_config"]["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    bad["llm_config"].pop("hidden_size")
    with pytest.raises(ConversionError) as err:
        model_config_from_hf(bad)
    message = str(err.value)
    assert "4 problem(s)" in message
    for part in (
        "qk_normalization is true",
        "norm_type is 'rms_norm'",
        "rope_scaling",
        "llm_config.hidden_size is missing",
    ):
        assert part in message


def test_other_language_models_are_refused(config):
    bad = copy.deepcopy(config)
    bad["llm_config"].update(architectures=["InternLM2ForCausalLM"], model_type="internlm2")
    with pytest.raises(ConversionError, match="only Qwen2ForCausalLM"):
        model_config_from_hf(bad)


# ------------------------------------------------------------------------------ SAIL-VL-1.6 and SAIL-VL2

SAIL_SPECS = {
    "sail16": F.Spec(vision_arch="aimv2", select_layer=-2),
    "sail2": F.Spec(vision_arch="aimv2", llm_arch="qwen3", head_dim=32, tied=True),
}


@pytest.fixture(scope="module")
def sail_configs():
    return {name: F.chat_config(spec, F.build_modules(spec).qwen) for name, spec in SAIL_SPECS.items()}


def test_reads_sail_vl_16_and_sail_vl2(sail_configs):
    sail16, sail2 = (model_config_from_hf(sail_configs[n]) for n in ("sail16", "sail2"))
    assert (
        sail_configs["sail2"]["model_type"] == "sailvl"
        and sail_configs["sail2"]["vision_config"]["model_type"] == "sailvit"
    )
    for cfg in (sail16, sail2):
        v = cfg.vision
        assert (v.arch, v.hidden_size, v.num_layers, v.num_attention_heads, v.ffn_hidden_size) == (
            "aimv2",
            32,
            3,
            4,
            64,
        )
        assert (v.image_size, v.patch_size, v.layernorm_epsilon, v.drop_path_rate) == (56, 14, 1e-5, 0.0)
    assert (sail16.vision.select_layer, sail16.vision.num_built_layers, sail16.vision.applies_final_norm) == (
        -2,
        2,
        False,
    )
    assert sail2.vision.applies_final_norm
    assert (sail16.language.arch, sail16.language.head_dim) == ("qwen2", None)
    lang = sail2.language
    assert (lang.arch, lang.head_dim, lang.kv_channels, lang.tie_word_embeddings) == ("qwen3", 32, 32, True)


@pytest.mark.parametrize("name", sorted(SAIL_SPECS))
def test_sail_round_trip_is_identical(sail_configs, name):
    config = sail_configs[name]
    assert hf_config_from_model(model_config_from_hf(config), config) == config


def test_sail_vl_defaults_select_layer_to_minus_4(sail_configs):
    # SAIL-VL's config classes default select_layer to -4 (InternVLChatConfig: -1); writing -4 back omits it again.
    config = copy.deepcopy(sail_configs["sail2"])
    config.pop("select_layer")
    config["vision_config"]["num_hidden_layers"] = 5
    cfg = model_config_from_hf(config)
    assert (cfg.vision.select_layer, cfg.vision.num_built_layers) == (-4, 2)
    assert hf_config_from_model(cfg, config) == config


@pytest.mark.parametrize("preset", ["tiny", "tiny-aimv2", "tiny-sail-vl2", "tiny-sail-vl2-moe", "sail-vl2-moe"])
def test_fresh_config_describes_the_model(preset):
    # A trainer checkpoint exported without any template: every field the reader needs is written.
    from sail_megatron.config.presets import get_preset
    from sail_megatron.convert.hf_config import stage1_template

    cfg = get_preset(preset)
    config = hf_config_from_model(cfg, stage1_template({}, {}, "internvl2_5", "fp32"), "fp32")
    back = model_config_from_hf(config, make_vocab_size_divisible_by=cfg.language.make_vocab_size_divisible_by)
    assert back == cfg
    expected = {"tiny": "internvl_chat", "tiny-aimv2": "internvl_chat"}.get(preset, "sailvl")
    assert config["model_type"] == expected


def test_every_unsupported_sail_feature_is_listed(sail_configs):
    bad = copy.deepcopy(sail_configs["sail2"])
    bad["vision_config"].update(qkv_bias=True, use_bias=True)
    # Qwen3-MoE converts, but only when every layer is a mixture of experts.
    bad["llm_config"].update(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=128, mlp_only_layers=[0]
    )
    with pytest.raises(ConversionError) as err:
        model_config_from_hf(bad)
    message = str(err.value)
    assert "3 problem(s)" in message
    for part in (
        "vision_config.qkv_bias is true",
        "vision_config.use_bias is true",
        "only Qwen3-MoE models whose every layer is a mixture of experts",
    ):
        assert part in message


def test_qwen3_attention_bias_and_aimv2_counting_from_the_front_are_refused(sail_configs):
    bad = copy.deepcopy(sail_configs["sail2"])
    bad["llm_config"]["attention_bias"] = True
    bad["select_layer"] = 2
    with pytest.raises(ConversionError) as err:
        model_config_from_hf(bad)
    assert "2 problem(s)" in str(err.value)
    assert "llm_config.attention_bias is true" in str(err.value)
    assert "select_layer is 2" in str(err.value) and "use a negative select_layer" in str(err.value)


def test_transformers_aimv2_vision_config():
    # An HF-native AIMv2 release (transformers' Aimv2VisionConfig): read alike, rewritten as ml-aim's AIMv2Config.
    from transformers import Aimv2VisionConfig

    from sail_megatron.convert.hf_config import sail_vision_config, vision_from_hf

    native = Aimv2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56
    ).to_diff_dict()
    assert native["use_head"] is True and native["model_type"] == "aimv2_vision_model"
    problems = []
    v = vision_from_hf(native, -1, problems)
    assert not problems and (v.arch, v.hidden_size, v.image_size, v.layernorm_epsilon) == ("aimv2", 32, 56, 1e-5)
    as_sail = sail_vision_config(native)
    assert (as_sail["model_type"], as_sail["use_bias"], "use_head" in as_sail) == ("aimv2", False, False)
    assert vision_from_hf(as_sail, -1, problems) == v and not problems
    vision_from_hf({**native, "is_native": True, "mlp_bias": True}, -1, problems)
    assert len(problems) == 2 and "is_native is true" in problems[1] and "mlp_bias is true" in problems[0]
