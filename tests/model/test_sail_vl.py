"""The model's structure and attention masks, the vision merge, drop path."""

import pytest
import torch

from sail_megatron.model.sail_vl import merge_vision_embeddings, padded_vocab_size
from sail_megatron.model.vision_layer import drop_path
from tests.helpers.multiprocess import run_on_ranks
from tests.model import workers


def test_structure_and_attention_masks():
    (r,) = run_on_ranks(workers.structure_and_masks, 1)
    assert r["vision_layers"] == 3
    assert r["causal_before"] == 0.0, "a later token changed earlier logits: the LM is not causal"
    assert r["causal_after"] > 0.0
    assert r["vision_first_patch_moves"] > 0.0, "the ViT must attend bidirectionally"
    assert r["identity_error"] < 1e-6, "with layer scale 0 each ViT layer must be the identity"


@pytest.mark.parametrize("select_layer,built", [(-1, 3), (-2, 2), (1, 1), (3, 3)])
def test_select_layer_truncates_the_encoder(select_layer, built):
    (n,) = run_on_ranks(workers.select_layer_count, 1, select_layer)
    assert n == built


def test_frozen_vision_gets_no_gradient_and_projector_does():
    (r,) = run_on_ranks(workers.frozen_vision_builds_no_graph, 1)
    assert r["shape"] == (2 * 16, 64)
    assert r["projector_grad"] and not r["vision_grad"]


IMG = 7


def _ids(mask):
    return torch.where(mask, IMG, 1)


def test_merge_places_vision_tokens_in_sample_order():
    s, b, h = 6, 2, 3
    text = torch.zeros(s, b, h)
    mask = torch.zeros(b, s, dtype=torch.bool)
    mask[0, [1, 2]] = True
    mask[1, [0, 5]] = True
    vision = torch.arange(4 * h, dtype=torch.float).reshape(4, h) + 1
    merged = merge_vision_embeddings(text, vision, _ids(mask), IMG)
    assert torch.equal(merged[1, 0], vision[0]) and torch.equal(merged[2, 0], vision[1])
    assert torch.equal(merged[0, 1], vision[2]) and torch.equal(merged[5, 1], vision[3])
    assert merged[~mask.T].abs().sum() == 0, "text positions must keep their embeddings"


def test_merge_rejects_count_mismatch():
    mask = torch.zeros(1, 4, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(ValueError, match="3 <IMG_CONTEXT> tokens but the images give 2"):
        merge_vision_embeddings(torch.zeros(4, 1, 2), torch.zeros(2, 2), _ids(mask), IMG)


def test_merge_gradient_flows_to_vision_only_at_image_slots():
    text = torch.randn(5, 1, 2, requires_grad=True)
    vision = torch.randn(2, 2, requires_grad=True)
    mask = torch.tensor([[False, True, False, True, False]])
    merge_vision_embeddings(text, vision, _ids(mask), IMG).sum().backward()
    assert torch.equal(vision.grad, torch.ones(2, 2))
    assert torch.equal(text.grad[:, 0, 0], torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))


def test_drop_path_drops_whole_tiles_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(10, 4000, 3)  # [s, tiles, h]
    y = drop_path(x, 0.25, training=True, tile_tokens=10)
    per_tile = y[0, :, 0]
    assert set(per_tile.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.equal(y, y[:1].expand_as(y)), "a tile is kept or dropped whole"
    assert abs(float((per_tile == 0).float().mean()) - 0.25) < 0.03
    assert torch.equal(drop_path(x, 0.25, training=False, tile_tokens=10), x)


def test_drop_path_packed_drops_the_same_tiles():
    """Packed tiles (rows k*s..(k+1)*s, then pad rows) draw and drop exactly as batched ones do."""
    s, tiles, pad = 5, 7, 3
    x = torch.randn(s, tiles, 2)
    torch.manual_seed(3)
    batched = drop_path(x, 0.5, training=True, tile_tokens=s)
    packed_in = torch.cat([x.transpose(0, 1).reshape(tiles * s, 2), torch.ones(pad, 2)]).unsqueeze(1)
    torch.manual_seed(3)
    packed = drop_path(packed_in, 0.5, training=True, tile_tokens=s)
    torch.testing.assert_close(packed[: tiles * s, 0].view(tiles, s, 2).transpose(0, 1), batched)
    torch.testing.assert_close(packed[tiles * s :, 0], torch.ones(pad, 2))


def test_padded_vocab():
    assert padded_vocab_size(151936, 128, 1) == 151936
    assert padded_vocab_size(151936, 128, 8) == 152576  # next multiple of 128 * 8
    assert padded_vocab_size(500, 64, 2) == 512


def test_local_checkpoints_use_transformer_engine_norm_names():
    # Separate pre-norms (local layers) are saved under TE's fused names, so CPU-written or converted
    # checkpoints load into TE layers on GPU clusters (megatron-core does the same for its GPT local spec).
    (keys,) = run_on_ranks(workers.checkpoint_keys, 1)
    assert not [k for k in keys if "layernorm." in k and "final_layernorm" not in k]
    assert not [k for k in keys if k.startswith("projector.layer_norm")]
    for expected in (
        "vision_model.decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        "vision_model.decoder.layers.mlp.linear_fc1.layer_norm_bias",
        "projector.mlp.encoder.linear_fc1.layer_norm_weight",
        "language_model.decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        "language_model.decoder.layers.mlp.linear_fc1.layer_norm_weight",
    ):
        assert expected in keys, expected


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_every_weight_is_in_the_training_dtype(dtype):
    # megatron's distributed optimizer keeps one dtype per buffer; torch-backed norms would stay fp32.
    (dtypes,) = run_on_ranks(workers.stage_dtypes, 1, dtype)
    assert dtypes == [str({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])]


def test_micro_batch_without_tiles_still_runs_the_vision_side():
    # Overlapped gradient reduction waits for every parameter's gradient; FP8 reduces amaxes per region.
    (r,) = run_on_ranks(workers.text_only_batch_reaches_every_vision_parameter, 1)
    assert r["all_have_grad"] and r["grads_zero"]
    assert r["same_output"] == 0.0


@pytest.mark.parametrize("preset,tiles", [("tiny", 3), ("tiny", 1), ("tiny-aimv2", 5)])
def test_packed_tiles_match_batched_tiles(preset, tiles):
    """The ViT's packed layout (what FP8 runs for InternViT) is the batched one up to fp32 reduction order."""
    (r,) = run_on_ranks(workers.packed_tiles_match_batched_tiles, 1, preset, tiles)
    assert r["shape_equal"]
    assert r["features"] < 1e-5, r
    assert r["grads"] < 1e-4, r


def test_blank_vision_term_is_zero_in_fp16():
    (term,) = run_on_ranks(workers.blank_vision_term_in_fp16, 1)
    assert term == 0.0
