"""Analytic parameter counts (sail_megatron.model.param_count) against real models.

References: Hugging Face `transformers` models built on the meta device (no memory allocated) for
the language model and the vision encoder, a plain-torch projector, and the megatron-core model that
`build_model` actually builds for the tiny preset. Counts are compared exactly; the 0.5% tolerance
the presets promise is asserted as well so a failure reports how far off a count is.
"""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

from sail_megatron.config import LanguageConfig, ModelConfig, ParallelConfig, PrecisionConfig
from sail_megatron.config.presets import VISION_PRESETS
from sail_megatron.model import param_count
from sail_megatron.model.param_count import count_parameters
from sail_megatron.model.presets import PRESETS, get_preset
from sail_megatron.model.sail_vl import padded_vocab_size
from tests.helpers.multiprocess import free_port

# megatron-core's TransformerConfig warns about its own default cuda_graph_scope when the model is built.
pytestmark = pytest.mark.filterwarnings("ignore:full scope is deprecated:UserWarning")

REL_TOL = 0.005  # the presets promise counts within 0.5% of the real models

QWEN25_15B_TIED = 1_543_714_304  # published Qwen2.5-1.5B (tied embeddings)
QWEN25_7B = 7_615_616_512  # published Qwen2.5-7B (untied lm_head)
INTERNVIT_300M = 304_012_288  # InternViT-300M-448px, all 24 layers
SAILVIT_HUGE = 682_031_616  # AIMv2-Huge-448 / SAILViT-Huge (the vision tower of SAIL-VL-1.5/1.6, SAIL-VL2)
SAILVIT_LARGE = 309_984_256  # AIMv2-Large-448 / SAILViT-Large
SAIL_VL_16_8B = 8_332_532_736  # SAIL-VL-1.6-8B's index: 16,665,065,472 bf16 bytes
QWEN3_30B_A3B = 30_532_122_624  # published Qwen3-30B-A3B (its model card: 30.5B in total, 3.3B activated)


def unique_numel(module: nn.Module) -> int:
    """Parameters counted once even when shared (tied embeddings); works on meta tensors."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def assert_count(actual: int, expected: int, what: str) -> None:
    assert abs(actual - expected) <= REL_TOL * expected, f"{what}: {actual:,} vs reference {expected:,} (over 0.5%)"
    assert actual == expected, f"{what}: {actual:,} vs reference {expected:,} (off by {actual - expected:+,})"


# ---------------------------------------------------------------------------------------------- language


def hf_qwen2_parameters(lang: LanguageConfig, tie_word_embeddings: bool) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=lang.hidden_size,
        intermediate_size=lang.ffn_hidden_size,
        num_hidden_layers=lang.num_layers,
        num_attention_heads=lang.num_attention_heads,
        num_key_value_heads=lang.num_query_groups,
        vocab_size=lang.vocab_size,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    if tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return unique_numel(model)


@pytest.mark.parametrize("preset", ["sail-vl-2b", "sail-vl-8b"])
def test_language_count_matches_transformers_qwen2(preset):
    lang = get_preset(preset).language
    reference = hf_qwen2_parameters(lang, lang.tie_word_embeddings)
    assert_count(param_count.language_parameters(lang), reference, f"{preset} language")
    assert_count(count_parameters(get_preset(preset)).language, reference, f"{preset} ParameterCount.language")


def test_language_counts_match_published_qwen25():
    lang_2b = get_preset("sail-vl-2b").language
    assert lang_2b.tie_word_embeddings is False  # SAIL-VL-2B unties the head of Qwen2.5-1.5B
    tied = replace(lang_2b, tie_word_embeddings=True)
    assert hf_qwen2_parameters(lang_2b, tie_word_embeddings=True) == QWEN25_15B_TIED
    assert param_count.language_parameters(tied) == QWEN25_15B_TIED
    # Untying adds exactly one more vocab x hidden matrix.
    assert param_count.language_parameters(lang_2b) == QWEN25_15B_TIED + lang_2b.vocab_size * lang_2b.hidden_size

    lang_7b = get_preset("sail-vl-8b").language
    assert hf_qwen2_parameters(lang_7b, lang_7b.tie_word_embeddings) == QWEN25_7B
    assert param_count.language_parameters(lang_7b) == QWEN25_7B


def hf_qwen3_parameters(lang: LanguageConfig) -> int:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        hidden_size=lang.hidden_size,
        intermediate_size=lang.ffn_hidden_size,
        num_hidden_layers=lang.num_layers,
        num_attention_heads=lang.num_attention_heads,
        num_key_value_heads=lang.num_query_groups,
        head_dim=lang.kv_channels,
        vocab_size=lang.vocab_size,
        tie_word_embeddings=lang.tie_word_embeddings,
        attention_bias=False,
    )
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == lang.tie_word_embeddings
    return unique_numel(model)


@pytest.mark.parametrize("preset", ["sail-vl2-2b", "sail-vl2-8b"])
def test_language_count_matches_transformers_qwen3(preset):
    lang = get_preset(preset).language
    assert lang.arch == "qwen3"
    reference = hf_qwen3_parameters(lang)
    assert_count(param_count.language_parameters(lang), reference, f"{preset} language")
    assert_count(count_parameters(get_preset(preset)).language, reference, f"{preset} ParameterCount.language")


def hf_qwen3_moe_parameters(lang: LanguageConfig) -> int:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        hidden_size=lang.hidden_size,
        intermediate_size=lang.ffn_hidden_size,
        moe_intermediate_size=lang.moe_ffn_hidden_size,
        num_hidden_layers=lang.num_layers,
        num_attention_heads=lang.num_attention_heads,
        num_key_value_heads=lang.num_query_groups,
        head_dim=lang.kv_channels,
        vocab_size=lang.vocab_size,
        num_experts=lang.num_experts,
        num_experts_per_tok=lang.moe_router_topk,
        norm_topk_prob=lang.moe_norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=lang.tie_word_embeddings,
    )
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    assert all(layer.mlp.__class__.__name__ == "Qwen3MoeSparseMoeBlock" for layer in model.model.layers)
    return unique_numel(model)


def test_qwen3_moe_count_matches_transformers_and_the_release():
    lang = get_preset("sail-vl2-moe").language
    assert (lang.arch, lang.num_experts, lang.moe_router_topk, lang.moe_ffn_hidden_size) == ("qwen3_moe", 128, 8, 768)
    assert hf_qwen3_moe_parameters(lang) == QWEN3_30B_A3B
    assert_count(param_count.language_parameters(lang), QWEN3_30B_A3B, "sail-vl2-moe language")
    # Active per token: attention, norms, embeddings, the router and 8 of the 128 experts of every layer.
    experts = lang.num_layers * (lang.num_experts - lang.moe_router_topk) * 3 * lang.hidden_size * 768
    active = param_count.language_parameters(lang, active=True)
    assert active == QWEN3_30B_A3B - experts
    assert 3.3e9 < active < 3.4e9  # the model card's "3.3B activated"
    tiny = get_preset("tiny-sail-vl2-moe").language
    assert_count(param_count.language_parameters(tiny), hf_qwen3_moe_parameters(tiny), "tiny-sail-vl2-moe language")


def test_sail_vl2_moe_total_is_sailvit_huge_projector_and_qwen3_30b_a3b():
    cfg = get_preset("sail-vl2-moe")
    counts = count_parameters(cfg)
    width = cfg.vision.hidden_size * cfg.projector.merge_factor**2
    h = cfg.language.hidden_size
    with torch.device("meta"):
        mlp1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, h), nn.GELU(), nn.Linear(h, h))
    reference = hf_aimv2_parameters(cfg.vision) + unique_numel(mlp1) + hf_qwen3_moe_parameters(cfg.language)
    assert reference == SAILVIT_HUGE + unique_numel(mlp1) + QWEN3_30B_A3B
    assert counts.total_checkpoint == counts.total_built == reference == 31_230_947_840


# ------------------------------------------------------------------------------------------------ vision


def hf_aimv2_parameters(v) -> int:
    """transformers' Aimv2VisionModel without its attention-pooling head (as SAIL-VL uses the encoder)."""
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    config = Aimv2VisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.ffn_hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        qkv_bias=False,
        mlp_bias=False,
        use_head=False,
        is_native=False,
    )
    with torch.device("meta"):
        model = Aimv2VisionModel(config)
    assert not any(n.startswith("head.") for n, _ in model.named_parameters())
    return unique_numel(model)


@pytest.mark.parametrize("name,expected", [("sailvit-huge", SAILVIT_HUGE), ("sailvit-large", SAILVIT_LARGE)])
def test_sailvit_counts_match_transformers_aimv2(name, expected):
    v = VISION_PRESETS[name]
    assert v.arch == "aimv2" and v.select_layer == -1
    assert hf_aimv2_parameters(v) == expected
    counts = count_parameters(ModelConfig(vision=v))
    assert_count(counts.vision_checkpoint, expected, f"{name} vision_checkpoint")
    assert_count(counts.vision_built, expected, f"{name} vision_built (all blocks and the final norm)")


def test_sail_vl_16_8b_total_matches_its_release():
    cfg = get_preset("sail-vl-1.6-8b")
    counts = count_parameters(cfg)
    assert counts.total_checkpoint == counts.total_built == SAIL_VL_16_8B
    width = cfg.vision.hidden_size * cfg.projector.merge_factor**2
    h = cfg.language.hidden_size
    with torch.device("meta"):
        mlp1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, h), nn.GELU(), nn.Linear(h, h))
    references = (
        hf_aimv2_parameters(cfg.vision)
        + unique_numel(mlp1)
        + hf_qwen2_parameters(cfg.language, cfg.language.tie_word_embeddings)
    )
    assert references == SAIL_VL_16_8B


# Parameters of transformers' InternVLVisionModel that InternViT (and so param_count) does not have:
# with use_mean_pooling=False the HF model ends in a LayerNorm (`layernorm`, weight + bias) applied to
# the last hidden state; InternViT has no final norm, and SAIL-VL reads an intermediate hidden state
# anyway. `embeddings.mask_token` would be one more (only with use_mask_token=True, off here); it is
# listed so the test notices if it ever appears.
HF_ONLY_VISION_PARAMETERS = ("layernorm.weight", "layernorm.bias", "embeddings.mask_token")


def hf_internvit_parameters(num_layers: int = 24):
    """(total InternViT-equivalent params, embedding params, params per encoder layer)."""
    from transformers.models.internvl import InternVLVisionConfig, InternVLVisionModel

    config = InternVLVisionConfig(
        hidden_size=1024,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        intermediate_size=4096,
        image_size=[448, 448],
        patch_size=[14, 14],
        use_qk_norm=False,
        attention_bias=True,
        norm_type="layer_norm",
        use_mean_pooling=False,
        use_absolute_position_embeddings=True,
        layer_scale_init_value=0.1,
        use_mask_token=False,
    )
    with torch.device("meta"):
        model = InternVLVisionModel(config)
    named = dict(model.named_parameters())
    assert {"layernorm.weight", "layernorm.bias"} <= named.keys()
    kept = {n: p for n, p in named.items() if n not in HF_ONLY_VISION_PARAMETERS}
    assert sum(p.numel() for p in named.values()) - sum(p.numel() for p in kept.values()) == 2 * 1024
    assert all(n.startswith(("embeddings.", "encoder.layer.")) for n in kept), sorted(kept)
    embeddings = sum(p.numel() for n, p in kept.items() if n.startswith("embeddings."))
    layer = sum(p.numel() for n, p in kept.items() if n.startswith("encoder.layer.0."))
    return sum(p.numel() for p in kept.values()), embeddings, layer


@pytest.fixture(scope="module")
def hf_vision():
    return hf_internvit_parameters()


def test_vision_checkpoint_count_matches_transformers_internvl(hf_vision):
    total, embeddings, layer = hf_vision
    cfg = get_preset("sail-vl-2b")
    assert total == INTERNVIT_300M
    assert_count(param_count.vision_embedding_parameters(cfg.vision), embeddings, "vision embeddings")
    assert_count(param_count.vision_layer_parameters(cfg.vision), layer, "vision layer")
    for preset in ("sail-vl-2b", "sail-vl-8b"):
        assert_count(count_parameters(get_preset(preset)).vision_checkpoint, total, f"{preset} vision_checkpoint")


def test_vision_built_stops_at_select_layer(hf_vision):
    _, embeddings, layer = hf_vision
    cfg = get_preset("sail-vl-2b")
    assert cfg.vision.select_layer == -4 and cfg.vision.num_built_layers == 21
    assert_count(count_parameters(cfg).vision_built, embeddings + 21 * layer, "sail-vl-2b vision_built")


# --------------------------------------------------------------------------------------------- projector


@pytest.mark.parametrize("preset", ["sail-vl-2b", "sail-vl-8b"])
def test_projector_count_matches_torch_mlp(preset):
    cfg = get_preset(preset)
    width = cfg.vision.hidden_size * cfg.projector.merge_factor**2
    assert width == 4096
    h = cfg.language.hidden_size
    with torch.device("meta"):
        mlp1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, h), nn.GELU(), nn.Linear(h, h))
    assert_count(count_parameters(cfg).projector, unique_numel(mlp1), f"{preset} projector")


# ------------------------------------------------------------------------------ tiny: the built model


def _build_counts(cfg: ModelConfig):
    from sail_megatron.model.build import build_model

    model = build_model(cfg, ParallelConfig(), PrecisionConfig(dtype="fp32"))
    parts = {name: unique_numel(getattr(model, name)) for name in ("vision_model", "projector", "language_model")}
    rows = model.language_model.embedding.word_embeddings.weight.shape[0]
    return unique_numel(model), parts, rows


@pytest.fixture(scope="module")
def built_tiny():
    """Parameter counts of the tiny model (and a variant cut at select_layer=-2) built in-process."""
    from sail_megatron.platform import destroy_distributed, init_distributed

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASTER_ADDR", "127.0.0.1")
        mp.setenv("MASTER_PORT", str(free_port()))
        mp.setenv("RANK", "0")
        mp.setenv("WORLD_SIZE", "1")
        init_distributed(ParallelConfig())
        try:
            cfg = get_preset("tiny")
            cfg.image_context_token_id = 3
            cut = get_preset("tiny")
            cut.image_context_token_id = 3
            cut.vision.select_layer = -2
            moe = get_preset("tiny-sail-vl2-moe")
            moe.image_context_token_id = 3
            yield {
                "tiny": (cfg, _build_counts(cfg)),
                "cut": (cut, _build_counts(cut)),
                "moe": (moe, _build_counts(moe)),
            }
        finally:
            destroy_distributed()


def test_tiny_count_equals_built_megatron_model(built_tiny):
    cfg, (total, parts, rows) = built_tiny["tiny"]
    lang = cfg.language
    # Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by * TP; the analytic count
    # uses the unpadded vocabulary, so the comparison is only exact when no padding arises.
    assert lang.vocab_size % lang.make_vocab_size_divisible_by == 0
    assert padded_vocab_size(lang.vocab_size, lang.make_vocab_size_divisible_by, 1) == lang.vocab_size
    assert rows == lang.vocab_size
    counts = count_parameters(cfg)
    assert cfg.vision.num_built_layers == cfg.vision.num_layers
    assert counts.vision_built == counts.vision_checkpoint
    assert parts == {
        "vision_model": counts.vision_built,
        "projector": counts.projector,
        "language_model": counts.language,
    }
    assert total == counts.total_built


def test_tiny_moe_count_equals_built_megatron_model(built_tiny):
    # megatron's MoELayer: a router [experts, hidden] and every expert's fc1/fc2 (SequentialMLP at EP 1).
    cfg, (total, parts, rows) = built_tiny["moe"]
    counts = count_parameters(cfg)
    assert rows == cfg.language.vocab_size
    assert parts["language_model"] == counts.language and total == counts.total_built
    assert counts.language_active < counts.language


def test_built_vision_stops_at_select_layer(built_tiny):
    cfg, (total, parts, _) = built_tiny["cut"]
    counts = count_parameters(cfg)
    assert cfg.vision.num_built_layers == cfg.vision.num_layers - 1
    assert parts["vision_model"] == counts.vision_built < counts.vision_checkpoint
    assert total == counts.total_built


# ------------------------------------------------------------------------------------------------- CLI


def test_presets_cli_prints_every_preset():
    result = subprocess.run(
        [sys.executable, "-m", "sail_megatron.model.presets"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for name in PRESETS:
        assert name in rows, result.stdout
        c = count_parameters(get_preset(name))
        assert f"{c.total_checkpoint:,}" in rows[name] and f"{c.language:,}" in rows[name]
