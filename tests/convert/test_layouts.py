"""The HF <-> megatron layout changes and the name mapping, without building a model."""

import pytest
import torch

from sail_megatron.convert import layouts, mapping
from sail_megatron.convert.hf_config import model_config_from_hf
from tests.convert import fixtures as F


def _labelled(heads: int, d: int, h: int, base: float) -> torch.Tensor:
    """Rows of head i carry the value base + i (so a row says which head it came from)."""
    return (base + torch.arange(heads).repeat_interleave(d)).float()[:, None].expand(heads * d, h).clone()


def test_qkv_interleaves_per_kv_group():
    # 4 query heads in 2 KV groups, head dim 2: megatron wants [q0 q1 k0 v0 | q2 q3 k1 v1].
    q, k, v = _labelled(4, 2, 3, 0), _labelled(2, 2, 3, 10), _labelled(2, 2, 3, 20)
    fused = layouts.qkv_to_mcore(q, k, v, num_heads=4, num_groups=2)
    heads = fused[::2, 0].tolist()
    assert heads == [0, 1, 10, 20, 2, 3, 11, 21]
    for got, want in zip(layouts.qkv_from_mcore(fused, 4, 2), (q, k, v)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("heads,groups", [(12, 2), (28, 4), (4, 4), (8, 1)])
def test_qkv_round_trip_is_exact_for_weights_and_biases(heads, groups):
    d, h = 8, 16
    gen = torch.Generator().manual_seed(heads)
    for rest in ((h,), ()):  # weight, bias
        q, k, v = (torch.randn(n * d, *rest, generator=gen).bfloat16() for n in (heads, groups, groups))
        back = layouts.qkv_from_mcore(layouts.qkv_to_mcore(q, k, v, heads, groups), heads, groups)
        assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_tensor_parallel_slices_hold_whole_groups():
    # Megatron gives TP rank r the r-th contiguous slice of linear_qkv: it must be groups r*G/TP.. whole.
    q, k, v = _labelled(8, 2, 1, 0), _labelled(4, 2, 1, 10), _labelled(4, 2, 1, 20)
    fused = layouts.qkv_to_mcore(q, k, v, 8, 4)
    rank1 = fused.chunk(2)[1][::2, 0].tolist()  # TP 2, second rank: groups 2 and 3
    assert rank1 == [4, 5, 12, 22, 6, 7, 13, 23]


def test_vision_stacked_qkv_round_trip():
    qkv = torch.randn(3 * 4 * 8, 32)
    fused = layouts.stacked_qkv_to_mcore(qkv, num_heads=4)
    q, k, v = qkv.chunk(3)
    assert torch.equal(fused[:8], q[:8]) and torch.equal(fused[8:16], k[:8]) and torch.equal(fused[16:24], v[:8])
    assert torch.equal(layouts.stacked_qkv_from_mcore(fused, 4), qkv)


def test_fc1_fusion_is_gate_then_up():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fused = layouts.fc1_to_mcore(gate, up)
    assert torch.equal(fused[:6], gate) and torch.equal(fused[6:], up)
    g2, u2 = layouts.fc1_from_mcore(fused)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_vocab_padding_and_removal():
    w = torch.randn(300, 8)
    padded = layouts.pad_vocab(w, 384)
    assert padded.shape == (384, 8) and torch.equal(padded[:300], w) and not padded[300:].any()
    assert torch.equal(layouts.strip_vocab(padded, 300), w)


LAYOUT_SPECS = {
    "untied": F.Spec(),
    "tied_cut": F.Spec(tied=True, select_layer=-2),
    "tied_stored_front": F.Spec(tied=True, lm_head_stored=True, select_layer=1),
    "aimv2_qwen2_cut": F.Spec(vision_arch="aimv2", select_layer=-2),
    "aimv2_qwen3": F.Spec(vision_arch="aimv2", llm_arch="qwen3", head_dim=32, tied=True, lm_head_stored=True),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_SPECS))
def test_expected_names_and_shapes_match_transformers_models(name):
    spec = LAYOUT_SPECS[name]
    stored = spec.lm_head_stored
    modules = F.build_modules(spec)
    tensors = {
        **F.vision_tensors(modules, "vision_model."),
        **{f"mlp1.{n}": t for n, t in modules.mlp1.state_dict().items()},
        **F.qwen_tensors(modules.qwen, "language_model.", stored),
    }
    cfg = model_config_from_hf(F.chat_config(spec, modules.qwen))
    expected = mapping.expected_hf_shapes(cfg, lm_head_stored=stored)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == expected
    # Every HF tensor is used exactly once: by a rule, or carried as an unused ViT layer.
    used = [n for r in mapping.tensor_rules(cfg, stored) for n in r.hf] + mapping.unused_hf_names(cfg)
    assert sorted(used) == sorted(expected)
    cut = spec.vision_layers - cfg.vision.num_built_layers
    if spec.vision_arch == "aimv2":  # 7 tensors a block, and the final norm unless select_layer is -1
        assert len(mapping.unused_hf_names(cfg)) == 7 * cut + (spec.select_layer != -1)
    else:
        assert len(mapping.unused_hf_names(cfg)) == 14 * cut


def test_aimv2_transformers_names_are_exact_both_ways():
    modules = F.build_modules(F.Spec(vision_arch="aimv2", vision_head=True))
    native = modules.vit.state_dict()
    ml_aim = F.aimv2_tensors(modules.vit, "")  # the fixtures' own, independent mapping
    covered = []
    for name, tensor in ml_aim.items():
        sources = mapping.aimv2_transformers_names(name)
        covered += sources
        assert torch.equal(mapping.aimv2_from_transformers(name, [native[n] for n in sources]), tensor), name
        shape = mapping.aimv2_from_transformers_shape(name, [tuple(native[n].shape) for n in sources])
        assert shape == tuple(tensor.shape), name
        back = mapping.aimv2_to_transformers(name, tensor)
        assert sorted(back) == sorted(sources) and all(torch.equal(back[n], native[n]) for n in sources), name
    # Every transformers tensor but the pooling head has exactly one ml-aim home.
    assert sorted(covered) == sorted(n for n in native if not n.startswith(mapping.AIMV2_TRANSFORMERS_HEAD_PREFIX))
    assert any(n.startswith("head.") for n in native)
