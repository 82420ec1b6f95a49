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
