"""FLOP counting against hand-computed values with the literal SAIL-VL dimensions (docs/design.md, Counting FLOPs)."""

import pytest
import torch

from sail_megatron.config import FreezeConfig
from sail_megatron.model.presets import get_preset
from sail_megatron.training.flops import (
    FlopBreakdown,
    PeakFlops,
    Trains,
    llm_attention_forward_flops,
    llm_linear_forward_flops_per_token,
    mfu,
    mfu_figures,
    peak_flops,
    projector_forward_flops_per_tile,
    training_flops,
    vit_forward_flops_per_tile,
)

# InternViT-300M-448px: 1024 patches + CLS, hidden 1024, FFN 4096, patch 14.
VIT_TOKENS, VIT_H, VIT_FFN = 1025, 1024, 4096
VIT_LAYER = 2 * VIT_TOKENS * (4 * VIT_H**2 + 2 * VIT_H * VIT_FFN) + 4 * VIT_TOKENS**2 * VIT_H
VIT_PATCH_EMBED = 2 * 1024 * (3 * 14 * 14 * VIT_H)
VIT_21 = 21 * VIT_LAYER + VIT_PATCH_EMBED  # select_layer -4: 21 of 24 layers built
VIT_24 = 24 * VIT_LAYER + VIT_PATCH_EMBED

# Qwen2.5-1.5B: hidden 1536, 28 layers, 12 heads of 128, 2 KV heads, FFN 8960, vocab 151936 (= 1187 * 128).
LLM_2B_TOKEN = 28 * 2 * (2 * 1536 * 1536 + 2 * 1536 * 2 * 128 + 3 * 1536 * 8960) + 2 * 1536 * 151936
# Qwen2.5-7B: hidden 3584, 28 layers, 28 heads of 128, 4 KV heads, FFN 18944, vocab 152064 (= 1188 * 128).
LLM_8B_TOKEN = 28 * 2 * (2 * 3584 * 3584 + 2 * 3584 * 4 * 128 + 3 * 3584 * 18944) + 2 * 3584 * 152064
PROJ_2B_TILE = 2 * 256 * (4096 * 1536 + 1536 * 1536)
PROJ_8B_TILE = 2 * 256 * (4096 * 3584 + 3584 * 3584)


def _causal_attention(hidden: int, lengths) -> int:
    return 28 * sum(2 * 2 * n * n * hidden // 2 for n in lengths)


def test_vit_forward_per_tile():
    model = get_preset("sail-vl-2b")
    assert vit_forward_flops_per_tile(model.vision) == VIT_21
    model.vision.select_layer = -1
    full = vit_forward_flops_per_tile(model.vision)
    assert full == VIT_24
    assert 0.72e12 < full < 0.73e12  # docs/design.md, Counting FLOPs: about 0.72 TFLOP per 448 tile


@pytest.mark.parametrize("preset,token", [("sail-vl-2b", LLM_2B_TOKEN), ("sail-vl-8b", LLM_8B_TOKEN)])
def test_llm_linear_per_token(preset, token):
    assert llm_linear_forward_flops_per_token(get_preset(preset).language) == token


# Qwen3-30B-A3B (sail-vl2-moe): hidden 2048, 48 layers, 32 heads of 128, 4 KV heads; per layer a router GEMM
# over 128 experts and 8 routed experts' SwiGLU of width 768 (not all 128); vocab 151936, untied.
MOE_ATTENTION = 2 * (2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048)
MOE_MLP = 2 * 2048 * 128 + 8 * 2 * 3 * 2048 * 768
LLM_30B_A3B_TOKEN = 48 * (MOE_ATTENTION + MOE_MLP) + 2 * 2048 * 151936


def test_moe_counts_active_experts_only():
    lang = get_preset("sail-vl2-moe").language
    assert llm_linear_forward_flops_per_token(lang) == LLM_30B_A3B_TOKEN
    assert 6.08e9 < LLM_30B_A3B_TOKEN < 6.09e9  # about 2 x the 3.3B active weights less the embedding lookup
    # All 128 experts would be 16x the expert FLOPs: the count follows top-k, not the expert count.
    from dataclasses import replace

    more_experts = replace(lang, num_experts=256)
    assert llm_linear_forward_flops_per_token(more_experts) - LLM_30B_A3B_TOKEN == 48 * 2 * 2048 * 128  # router only
    wider_topk = replace(lang, moe_router_topk=16)
    assert llm_linear_forward_flops_per_token(wider_topk) - LLM_30B_A3B_TOKEN == 48 * 8 * 2 * 3 * 2048 * 768


def test_output_layer_counts_padded_vocab():
    lang = get_preset("sail-vl-2b").language
    # TP=2 pads 151936 up to a multiple of 256: 152064.
    extra = llm_linear_forward_flops_per_token(lang, tensor_parallel_size=2) - LLM_2B_TOKEN
    assert extra == 2 * 1536 * (152064 - 151936)


@pytest.mark.parametrize(
    "preset,token,hidden,proj",
    [("sail-vl-2b", LLM_2B_TOKEN, 1536, PROJ_2B_TILE), ("sail-vl-8b", LLM_8B_TOKEN, 3584, PROJ_8B_TILE)],
)
def test_all_trainable_micro_batch(preset, token, hidden, proj):
    f = training_flops(get_preset(preset), [1000, 3000], num_tiles=5, trains=(True, True, True))
    assert f.vision == 3 * 5 * VIT_21
    assert f.projector == 3 * 5 * proj
    assert f.language_linear == 3 * 4000 * token
    assert f.language_attention == 3 * _causal_attention(hidden, [1000, 3000])
    assert f.total == f.vision + f.projector + f.language_linear + f.language_attention
    assert f.forward_total * 3 == f.total


def test_packing_changes_attention_not_linear():
    model = get_preset("sail-vl-2b")
    packed = training_flops(model, [1000, 3000], 0, Trains(True, True, True))
    single = training_flops(model, [4000], 0, Trains(True, True, True))
    assert packed.language_linear == single.language_linear
    assert packed.language_attention < single.language_attention
    # (1000^2 + 3000^2) / 4000^2 of the single sample's attention
    assert packed.language_attention * 16 == single.language_attention * 10
    assert packed.vision == packed.projector == 0


def test_stage_multipliers():
    model = get_preset("sail-vl-2b")
    lengths, tiles = [4096], 7
    fwd = training_flops(model, lengths, tiles, (False, False, False))  # nothing trains: forward only
    assert fwd.total == fwd.forward_total

    stage1 = training_flops(model, lengths, tiles, FreezeConfig(trainable=["projector"]))
    assert (stage1.vision, stage1.projector) == (fwd.vision, 3 * fwd.projector)
    assert (stage1.language_linear, stage1.language_attention) == (2 * fwd.language_linear, 2 * fwd.language_attention)

    stage2 = training_flops(model, lengths, tiles, FreezeConfig(trainable=["vision", "projector"]))
    assert stage2.vision == 3 * fwd.vision and stage2.projector == 3 * fwd.projector
    assert stage2.language == 2 * fwd.language

    sft = training_flops(model, lengths, tiles, FreezeConfig())
    assert sft.total == 3 * fwd.total


def test_per_token_at_4096_and_sum():
    model = get_preset("sail-vl-2b")
    f = training_flops(model, [4096], 0, (True, True, True))
    assert f.language == 3 * 4096 * (LLM_2B_TOKEN + 28 * 2 * 4096 * 1536)
    assert isinstance(f + f, FlopBreakdown) and (f + f).total == 2 * f.total


def test_bad_inputs():
    model = get_preset("tiny")
    with pytest.raises(ValueError):
        training_flops(model, [10], 1, (True, True))
    with pytest.raises(ValueError):
        training_flops(model, [-1], 1, (True, True, True))


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp8") == 1979e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H100 PCIe", "fp8") == 1513e12
    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert peak_flops("NVIDIA B200", "fp8") == 4500e12
    assert peak_flops("cpu", "bf16") is None
    assert peak_flops("cpu", "bf16", override=1e12) == 1e12
    with pytest.raises(ValueError):
        peak_flops("NVIDIA H100 80GB HBM3", "int4")
    assert mfu(494.5e12, peak_flops("NVIDIA H100 80GB HBM3", "bf16")) == pytest.approx(0.5)
    assert mfu(1e12, None) is None


def test_mfu_figures_against_both_peaks():
    # FP8 on an H100: MFU against the bf16 peak and against the FP8 peak, from one formula.
    h100 = PeakFlops(bf16=peak_flops("NVIDIA H100 80GB HBM3", "bf16"), fp8=peak_flops("NVIDIA H100 80GB HBM3", "fp8"))
    figures = mfu_figures(494.5e12, h100)
    assert figures["mfu"] == pytest.approx(0.5) and figures["mfu_fp8"] == pytest.approx(494.5 / 1979)
    assert mfu_figures(494.5e12, PeakFlops(bf16=989e12)) == {"mfu": pytest.approx(0.5), "mfu_fp8": None}
    assert mfu_figures(1e12, PeakFlops()) == {"mfu": None, "mfu_fp8": None}


@pytest.mark.parametrize("preset", ["tiny", "tiny-aimv2", "tiny-sail-vl2", "tiny-sail-vl2-moe"])
def test_counts_equal_torch_flop_counter_on_the_built_model(preset):
    """The formulas against torch's FLOP counter over the real model: the ViT on one tile, the projector
    and the decoder's linear layers per token (the counter sees matmuls and convolutions, as we count)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sail_megatron.convert.mcore_io import build_empty_model, single_process

    cfg = get_preset(preset)
    with single_process():
        model = build_empty_model(cfg, "fp32").requires_grad_(False)  # the counter's module hooks want no autograd
        tiles = torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size)
        with FlopCounterMode(display=False) as vit:
            features = model.vision_model(tiles)
        assert vit.get_total_flops() == vit_forward_flops_per_tile(cfg.vision)
        shuffled = torch.zeros(1, cfg.tokens_per_tile, features.shape[-1] * cfg.projector.merge_factor**2)
        with FlopCounterMode(display=False) as proj:
            model.projector(shuffled)
        assert proj.get_total_flops() == projector_forward_flops_per_tile(cfg)
        length = 24
        ids = torch.zeros(1, length, dtype=torch.long)
        with FlopCounterMode(display=False) as lm:
            model.language_model(input_ids=ids, position_ids=torch.arange(length)[None], attention_mask=None)
        # The counter sees the full L x L score matmuls; causal attention counts half of them.
        expected = length * llm_linear_forward_flops_per_token(cfg.language)
        assert lm.get_total_flops() == expected + 2 * llm_attention_forward_flops(cfg.language, [length])
