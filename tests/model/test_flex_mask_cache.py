"""flex_attention's block mask for packed rows: built once per micro-batch and shared by its layers.
The flex path runs on CUDA only; here its mask cache runs on the CPU with flex_attention uncompiled."""

import pytest
import torch
import torch.nn.functional as F

from sail_megatron.model import packed_attention
from sail_megatron.model.packed_attention import LastBlockMask, document_block_mask, document_mask

CPU = torch.device("cpu")
UNCOMPILED = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


class CountingBuilder:
    def __init__(self):
        self.calls = 0

    def __call__(self, cu_seqlens, total, device):
        self.calls += 1
        return object()


def test_one_build_per_micro_batch_for_all_layers():
    build = CountingBuilder()
    masks = LastBlockMask(build)
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    per_layer = [masks(cu, 16, CPU) for _ in range(6)]
    assert build.calls == 1 and all(m is per_layer[0] for m in per_layer)
    masks(cu.clone(), 16, CPU)  # the next micro-batch: a new tensor, even with equal boundaries
    assert build.calls == 2


def test_changed_boundaries_or_length_rebuild():
    build = CountingBuilder()
    masks = LastBlockMask(build)
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    masks(cu, 16, CPU)
    cu[1] = 6  # in place: same object, new version
    masks(cu, 16, CPU)
    masks(cu, 32, CPU)
    assert build.calls == 3
    masks(cu, 32, CPU)
    assert build.calls == 3


def test_inference_tensors_are_not_cached():
    build = CountingBuilder()
    masks = LastBlockMask(build)
    with torch.inference_mode():
        cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    masks(cu, 16, CPU)
    masks(cu, 16, CPU)
    assert build.calls == 2


def _uncompiled_flex(monkeypatch):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(packed_attention, "_compiled_flex_attention", lambda: flex.flex_attention)


@UNCOMPILED
def test_flex_layers_of_a_micro_batch_share_one_block_mask(monkeypatch):
    _uncompiled_flex(monkeypatch)
    built = []

    def recording_build(cu_seqlens, total, device):
        built.append(document_block_mask(cu_seqlens, total, device))
        return built[-1]

    monkeypatch.setattr(packed_attention, "_block_masks", {True: LastBlockMask(recording_build)})
    g = torch.Generator().manual_seed(0)
    for cu in (torch.tensor([0, 40, 100, 128], dtype=torch.int32), torch.tensor([0, 64, 128], dtype=torch.int32)):
        for _layer in range(3):
            q, k, v = (torch.randn(1, 2, 128, 16, generator=g) for _ in range(3))
            packed_attention._flex_document_attention(q, k, v, cu, 0.25)
    assert len(built) == 2


@UNCOMPILED
@pytest.mark.parametrize("causal", [True, False])  # decoder rows; the ViT's packed tiles
def test_flex_document_mask_matches_the_sdpa_reference(monkeypatch, causal):
    _uncompiled_flex(monkeypatch)
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 37, 90, 150, 200], dtype=torch.int32)
    q = torch.randn(1, 4, 200, 16, generator=g)
    k, v = (torch.randn(1, 2, 200, 16, generator=g) for _ in range(2))  # GQA: 2 groups for 4 heads
    out = packed_attention._flex_document_attention(q, k, v, cu, 0.25, causal)
    mask = document_mask(cu, 200, causal)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.25
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
