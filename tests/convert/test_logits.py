"""Converted checkpoints give `transformers`' logits: TP1/PP1, TP2 and PP2, loaded by the trainer's loader.

The reference is the very transformers modules the checkpoint was written from (Qwen2ForCausalLM or
Qwen3ForCausalLM, InternVLVisionModel or Aimv2VisionModel) with InternVL's / SAIL-VL's glue
(tests/convert/fixtures.py); fp32 throughout.
"""

import time

import pytest
import torch

from tests.convert import fixtures as F
from tests.convert import workers
from tests.helpers.multiprocess import run_on_ranks

ATOL = 1e-4
SPECS = {
    # untied, converted for TP 2 (512 vocabulary rows; TP 1 loads 384 of them), one unused ViT layer, ps v2
    "tp": F.Spec(select_layer=-2, seed=10),
    # tied embeddings, converted for PP 2, ps v1, select_layer counted from the front
    "pp": F.Spec(tied=True, select_layer=2, ps_version="v1", seed=11),
    # SAIL-VL-1.6 layout (AIMv2 + Qwen2), TP 2: features are the encoder's output after its final norm.
    "sail16": F.Spec(vision_arch="aimv2", seed=12),
    # SAIL-VL2 layout (AIMv2 + Qwen3, tied, lm_head stored, head_dim 32 != 64 / 4), PP 2.
    "sail2": F.Spec(vision_arch="aimv2", llm_arch="qwen3", head_dim=32, tied=True, lm_head_stored=True, seed=13),
}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Converts both checkpoints and evaluates them at TP1 in one process, then at TP2 and PP2 in two more."""
    root = tmp_path_factory.mktemp("logits")
    modules = {name: F.build_modules(spec) for name, spec in SPECS.items()}
    for name, m in modules.items():
        F.write_chat_checkpoint(root / name / "hf", m)
    inputs = {name: F.sample_inputs(spec) for name, spec in SPECS.items()}

    def run(name, tp, pp):
        return dict(ckpt=str(root / name / "mcore"), tp=tp, pp=pp, tokens=inputs[name][0], pixels=inputs[name][1])

    jobs = [
        dict(op="hf_to_mcore", hf_dir=str(root / f"{name}/hf"), out_dir=str(root / f"{name}/mcore"), **layout)
        for name, layout in (("tp", {"tp": 2}), ("pp", {"pp": 2}), ("sail16", {"tp": 2}), ("sail2", {"pp": 2}))
    ]
    jobs += [dict(op="layout_logits", **run("tp", 1, 1)), dict(op="layout_logits", **run("sail16", 1, 1))]
    began = time.perf_counter()
    *converted, tp1, sail16_tp1 = run_on_ranks(workers.convert_many, 1, jobs)[0]
    print(f"4 conversions + 2 TP1 evaluations: {time.perf_counter() - began:.1f} s")
    assert all(c["ok"] for c in converted), converted
    cases = [run("tp", 2, 1), run("pp", 1, 2)]
    # Each SAIL layout under both: a checkpoint converted for one layout loads under the other.
    cases += [run("sail16", 2, 1), run("sail16", 1, 2), run("sail2", 1, 2), run("sail2", 2, 1)]
    began = time.perf_counter()
    tp2, pp2, sail16_tp2, sail16_pp2, sail2_pp2, sail2_tp2 = zip(
        *run_on_ranks(workers.layout_logits_many, 2, workers.with_ports(cases))
    )
    print(f"6 evaluations at TP2 / PP2: {time.perf_counter() - began:.1f} s")
    expected = {name: F.expected_logits(modules[name], *inputs[name]) for name in SPECS}
    return {
        "modules": modules,
        "inputs": inputs,
        "expected": expected,
        "reports": {
            "tp1": [tp1],
            "tp2": [r for r in tp2 if r],
            "pp2": [r for r in pp2 if r],
            "sail16_tp1": [sail16_tp1],
            "sail16_tp2": [r for r in sail16_tp2 if r],
            "sail16_pp2": [r for r in sail16_pp2 if r],
            "sail2_pp2": [r for r in sail2_pp2 if r],
            "sail2_tp2": [r for r in sail2_tp2 if r],
        },
    }


def _check_logits(case, name, reports):
    (last,) = [r for r in reports if r.get("logits") is not None]
    expected = case["expected"][name]
    diff = (last["logits"] - expected).abs().max().item()
    assert diff < ATOL, f"max |logit diff| {diff:.2e}"
    print(f"{name}: max |logit diff| {diff:.2e}")
    assert torch.equal(last["logits"].argmax(-1), expected.argmax(-1))
    return last


def test_tp1_pp1_matches_transformers(case):
    last = _check_logits(case, "tp", case["reports"]["tp1"])
    assert last["padded_vocab"] == 384, "a TP-2 checkpoint (512 rows) loads into the TP-1 padding"
    # The vision tower alone: our select_layer output equals transformers' hidden state there.
    modules, (_, pixels) = case["modules"]["tp"], case["inputs"]["tp"]
    with torch.no_grad():
        hidden = modules.vit(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert (last["vision"] - hidden).abs().max() < 1e-5


def test_tp2_matches_transformers(case):
    assert _check_logits(case, "tp", case["reports"]["tp2"])["padded_vocab"] == 512


def test_pp2_tied_matches_transformers(case):
    _check_logits(case, "pp", case["reports"]["pp2"])


def test_aimv2_qwen2_matches_transformers(case):
    last = _check_logits(case, "sail16", case["reports"]["sail16_tp1"])
    # The vision tower alone: select_layer -1 is Aimv2VisionModel's last_hidden_state (after its final norm).
    modules, (_, pixels) = case["modules"]["sail16"], case["inputs"]["sail16"]
    with torch.no_grad():
        hidden = modules.vit(pixels).last_hidden_state
    assert (last["vision"] - hidden).abs().max() < 1e-5
    _check_logits(case, "sail16", case["reports"]["sail16_tp2"])
    _check_logits(case, "sail16", case["reports"]["sail16_pp2"])


def test_aimv2_qwen3_matches_transformers(case):
    _check_logits(case, "sail2", case["reports"]["sail2_pp2"])
    _check_logits(case, "sail2", case["reports"]["sail2_tp2"])
