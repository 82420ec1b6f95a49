"""Converted checkpoints give `transformers`' logits: TP1/PP1, TP2 and PP2, loaded by the trainer's loader.

The reference is the very transformers modules the checkpoint was written from (Qwen2ForCausalLM,
InternVLVisionModel) with InternVL's glue (tests/convert/fixtures.py); fp32 throughout.
"""

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
        dict(op="hf_to_mcore", hf_dir=str(root / "tp/hf"), out_dir=str(root / "tp/mcore"), tp=2),
        dict(op="hf_to_mcore", hf_dir=str(root / "pp/hf"), out_dir=str(root / "pp/mcore"), pp=2),
        dict(op="layout_logits", **run("tp", 1, 1)),
    ]
    converted_tp, converted_pp, tp1 = run_on_ranks(workers.convert_many, 1, jobs)[0]
    assert converted_tp["ok"] and converted_pp["ok"], (converted_tp, converted_pp)
    tp2, pp2 = zip(*run_on_ranks(workers.layout_logits_many, 2, [run("tp", 2, 1), run("pp", 1, 2)]))
    expected = {name: F.expected_logits(modules[name], *inputs[name]) for name in SPECS}
    return {
        "modules": modules,
        "inputs": inputs,
        "expected": expected,
        "reports": {"tp1": [tp1], "tp2": [r for r in tp2 if r], "pp2": [r for r in pp2 if r]},
    }


def _check_logits(case, name, reports):
    (last,) = [r for r in reports if r.get("logits") is not None]
    expected = case["expected"][name]
    diff = (last["logits"] - expected).abs().max().item()
    assert diff < ATOL, f"max |logit diff| {diff:.2e}"
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
