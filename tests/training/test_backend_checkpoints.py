"""Checkpoints move between layer backends: written with local layers (CPU, sail-convert), loaded into a
model with Transformer Engine's checkpoint shape (tests/helpers/te_contract.py), and back."""

import pytest

from tests.helpers.multiprocess import run_on_ranks
from tests.training import backend_workers

# InternViT+Qwen2.5, AIMv2+Qwen2.5, AIMv2+Qwen3, AIMv2+Qwen3-MoE
FAMILIES = ["tiny", "tiny-aimv2", "tiny-sail-vl2", "tiny-sail-vl2-moe"]


@pytest.mark.parametrize("preset", FAMILIES)
def test_local_and_te_checkpoints_load_into_each_other(preset, tmp_path):
    (out,) = run_on_ranks(backend_workers.cross_backend_round_trip, 1, preset, str(tmp_path))
    assert "language_model.decoder.final_layernorm" in out["te_norms"]
    if preset != "tiny":  # AIMv2's patch and final norms
        assert "vision_model.patch_norm" in out["te_norms"]
    if preset.startswith("tiny-sail-vl2"):  # Qwen3's per-head norms
        assert any(n.endswith("self_attention.q_layernorm") for n in out["te_norms"])
    if preset == "tiny-sail-vl2-moe":  # an MoE layer's pre-MLP norm stands alone under TE
        assert "language_model.decoder.layers.0.pre_mlp_layernorm" in out["te_norms"]
        assert "language_model.decoder.layers.0.input_layernorm" not in out["te_norms"]
    assert out["te_extra_states_written"] >= 1
    for direction in ("local_into_te", "local_into_te_converter", "te_into_local", "te_into_local_converter"):
        assert out[direction] == [], direction


def test_a_missing_weight_is_still_an_error(tmp_path):
    (message,) = run_on_ranks(backend_workers.missing_weight_is_an_error, 1, str(tmp_path))
    assert "language_model.decoder.final_layernorm.gain" in message, message


@pytest.mark.parametrize("preset", ["tiny", "tiny-sail-vl2", "tiny-sail-vl2-moe"])
def test_local_build_holds_no_module_of_the_importable_backend(preset):
    (out,) = run_on_ranks(backend_workers.module_tree_of_local_build, 1, preset)
    assert out["defaults"] == [] and out["te_modules"] == []
    assert out["final_norm"].startswith("torch.nn.modules.normalization.RMSNorm"), out["final_norm"]
