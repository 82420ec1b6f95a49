"""SAIL-VL2's mixture-of-experts language model (Qwen3-MoE) through sail-convert.

A tiny random Qwen3-MoE (4 experts, top 2, transformers' `Qwen3MoeForCausalLM`, per-expert tensors as its
releases store them) behind AIMv2 (SAIL-VL2 layout) or InternViT: HF -> megatron (for EP 2) -> HF is bitwise
with an identical config.json; the converted model gives transformers' logits single-process and under EP 2,
TP 2 and PP 2 (the trainer's loader); `sail-convert verify` agrees (its reference runs transformers'
Qwen3-MoE); `--format transformers` exports an InternViT + Qwen3-MoE model as transformers'
InternVLForConditionalGeneration with a qwen3_moe text_config, which loads without remote code, gives our
logits and generates.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub

import json
import time
from pathlib import Path

import pytest
import torch

from sail_megatron.convert.hf_io import SafetensorsFolder
from tests.convert import fixtures as F
from tests.convert import workers
from tests.helpers.multiprocess import run_on_ranks

ATOL = 1e-4
SPECS = {
    # SAIL-VL2-MoE layout: AIMv2 + Qwen3-MoE (untied, head_dim 32 x 4 heads != hidden 64), fp32.
    "sail2moe": F.Spec(vision_arch="aimv2", llm_arch="qwen3_moe", head_dim=32, seed=14),
    # InternViT + Qwen3-MoE in bf16, top-k probabilities not renormalized, one unused ViT layer.
    "bf16": F.Spec(llm_arch="qwen3_moe", head_dim=16, norm_topk=False, select_layer=-2, dtype=torch.bfloat16, seed=15),
}


def _read_all(folder: Path):
    with SafetensorsFolder(folder) as f:
        return {n: f.read(n) for n in f.tensors}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_convert")
    modules = {name: F.build_modules(spec) for name, spec in SPECS.items()}
    for name, m in modules.items():
        F.write_chat_checkpoint(root / name / "hf", m)
    # Another HF folder for the dense model, to see --ep refused there.
    F.write_chat_checkpoint(root / "dense" / "hf", F.build_modules(F.Spec(seed=16)))
    # Qwen3-MoE and AIMv2 as released apart (Qwen3-30B-A3B, SAILViT-Huge): a stage-1 checkpoint from them.
    F.write_standalone(root / "qwen3_moe", root / "aim", modules["sail2moe"])
    ids, pixels = F.sample_inputs(SPECS["sail2moe"])
    mcore = str(root / "sail2moe" / "mcore")
    jobs = [
        dict(op="hf_to_mcore", hf_dir=str(root / "sail2moe/hf"), out_dir=mcore, ep=2),
        dict(op="mcore_to_hf", ckpt=mcore, out_dir=str(root / "sail2moe/hf2")),
        dict(op="read_params", ckpt=mcore),
        dict(op="layout_logits", ckpt=mcore, tp=1, pp=1, tokens=ids, pixels=pixels),
        dict(op="verify", hf_dir=str(root / "sail2moe/hf"), ckpt=mcore, atol=1e-4, min_top1=1.0),
        dict(op="hf_to_mcore", hf_dir=str(root / "bf16/hf"), out_dir=str(root / "bf16/mcore"), pp=2),
        dict(op="mcore_to_hf", ckpt=str(root / "bf16/mcore"), out_dir=str(root / "bf16/hf2")),
        dict(op="hf_to_mcore", hf_dir=str(root / "bf16/hf"), out_dir=str(root / "bf16/mcore_ep3"), ep=3),
        dict(op="hf_to_mcore", hf_dir=str(root / "dense/hf"), out_dir=str(root / "dense/mcore"), ep=2),
        # fp32 evaluation of the bf16 weights: the routing without renormalization, against transformers
        dict(op="verify", hf_dir=str(root / "bf16/hf"), ckpt=str(root / "bf16/mcore"), atol=1e-4, min_top1=1.0),
        dict(op="init", llm_dir=str(root / "qwen3_moe"), vision_dir=str(root / "aim"), out_dir=str(root / "stage1")),
        dict(op="read_params", ckpt=str(root / "stage1")),
    ]
    began = time.perf_counter()
    (results,) = run_on_ranks(workers.convert_many, 1, jobs)
    print(f"MoE conversions and a TP1 evaluation: {time.perf_counter() - began:.1f} s")
    base = dict(ckpt=mcore, tokens=ids, pixels=pixels)
    layouts = {"ep2": dict(tp=1, pp=1, ep=2), "tp2": dict(tp=2, pp=1), "pp2": dict(tp=1, pp=2)}
    began = time.perf_counter()
    ranks = run_on_ranks(
        workers.layout_logits_many, 2, workers.with_ports([dict(**base, **v) for v in layouts.values()])
    )
    print(f"3 evaluations at EP2 / TP2 / PP2: {time.perf_counter() - began:.1f} s")
    reports = {name: [r[i] for r in ranks if r[i] is not None] for i, name in enumerate(layouts)}
    reports["tp1"] = [results[3]]
    expected = F.expected_logits(modules["sail2moe"], ids, pixels)
    return {"root": root, "list": results, "reports": reports, "expected": expected}


def _result(case, index: int):
    return case["list"][index]


def test_round_trip_is_bitwise_with_identical_config(case):
    root = case["root"]
    for name, (convert, export) in {"sail2moe": (0, 1), "bf16": (5, 6)}.items():
        assert _result(case, convert)["ok"] and _result(case, export)["ok"], (_result(case, convert), name)
        before, after = _read_all(root / name / "hf"), _read_all(root / name / "hf2")
        assert sorted(after) == sorted(before), name
        for n, t in before.items():
            assert after[n].dtype == t.dtype and torch.equal(after[n], t), n
        assert (root / name / "hf2" / "config.json").read_bytes() == (root / name / "hf" / "config.json").read_bytes()
    experts = [n for n in before if ".mlp.experts." in n]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)


def test_experts_and_router_land_in_megatron_layout(case):
    params, spec = _result(case, 2), SPECS["sail2moe"]
    record = params["__record__"]
    assert record["target_ep"] == 2 and record["model"]["language"]["arch"] == "qwen3_moe"
    assert record["model"]["language"]["num_experts"] == 4 and record["model"]["language"]["moe_router_topk"] == 2
    before = _read_all(case["root"] / "sail2moe" / "hf")
    hf, m = "language_model.model.layers.1.mlp.", "language_model.decoder.layers.1.mlp."
    assert torch.equal(params[m + "router.weight"], before[hf + "gate.weight"])
    fc1 = params[m + "experts.local_experts.3.linear_fc1.weight"]
    assert fc1.shape == (2 * spec.moe_ffn, spec.llm_hidden)
    assert torch.equal(
        fc1, torch.cat([before[hf + "experts.3.gate_proj.weight"], before[hf + "experts.3.up_proj.weight"]])
    )
    assert torch.equal(
        params[m + "experts.local_experts.3.linear_fc2.weight"], before[hf + "experts.3.down_proj.weight"]
    )
    assert not any(n.endswith("mlp.linear_fc1.weight") for n in params if n.startswith("language_model."))


@pytest.mark.parametrize("layout", ["tp1", "ep2", "tp2", "pp2"])
def test_logits_match_transformers_qwen3_moe(case, layout):
    """A checkpoint converted for EP 2 loads under every layout (TP 2 runs forward only: megatron trains MoE
    under TP only with sequence parallelism, which needs Transformer Engine)."""
    (last,) = [r for r in case["reports"][layout] if r.get("logits") is not None]
    diff = (last["logits"] - case["expected"]).abs().max().item()
    print(f"{layout}: max |logit diff| vs transformers' Qwen3MoeForCausalLM: {diff:.2e}")
    assert diff < ATOL
    assert torch.equal(last["logits"].argmax(-1), case["expected"].argmax(-1))


@pytest.mark.parametrize("name,index", [("sail2moe", 4), ("bf16", 9)])
def test_verify_against_the_transformers_reference(case, name, index):
    """`sail-convert verify`: renormalized top-k (AIMv2 + Qwen3-MoE) and plain softmax values (InternViT)."""
    report = _result(case, index)
    assert report.passed, report.format()
    print(f"verify {name}: " + ", ".join(f"{c.name} {c.max_abs_diff:.2e}" for c in report.cases))


def test_expert_parallel_size_is_checked_before_anything_is_written(case):
    bad, dense = _result(case, 7), _result(case, 8)
    assert not bad["ok"] and "EP 3 does not divide the 4 experts" in bad["error"] and not bad["out_exists"]
    assert not dense["ok"] and "EP 2 needs a mixture-of-experts language model" in dense["error"]
    assert "--ep" in bad["error"]


def test_stage1_init_from_a_qwen3_moe_release(case):
    assert _result(case, 10)["ok"], _result(case, 10)
    params, converted = _result(case, 11), _result(case, 2)
    assert params["__record__"]["model"]["language"]["arch"] == "qwen3_moe"
    language = [n for n in converted if n.startswith("language_model.")]
    assert any(".mlp.experts.local_experts." in n for n in language)
    for name in language:  # the same release weights as through the InternVL-chat folder
        assert torch.equal(params[name], converted[name]), name


# ---- --format transformers: InternViT + Qwen3-MoE as InternVLForConditionalGeneration ----


def _moe_config():
    from sail_megatron.config.presets import get_preset

    cfg = get_preset("tiny")  # InternViT + the projector; the language model is Qwen3-MoE
    cfg.language = get_preset("tiny-sail-vl2-moe").language
    return cfg


def _export_moe_and_evaluate(root: str, tok: str) -> dict:
    """Spawned: a trainer run of InternViT + Qwen3-MoE -> `--format transformers` (CLI) -> the megatron logits
    on the exported processor's inputs."""
    from tests.convert.test_to_transformers import export_and_read_back

    return export_and_read_back(_moe_config(), Path(root), tok)[0]


def test_transformers_export_of_internvit_qwen3_moe(tmp_path):
    from transformers import AutoModelForImageTextToText, InternVLForConditionalGeneration

    from sail_megatron.convert import transformers_layout as layout
    from sail_megatron.data.demo_dataset import demo_texts
    from sail_megatron.data.tokenizer import build_demo_tokenizer

    assert layout.unsupported(_moe_config()) == []
    tok = build_demo_tokenizer(demo_texts(), tmp_path / "tok", vocab_size=512)
    (result,) = run_on_ranks(_export_moe_and_evaluate, 1, str(tmp_path), str(tok))
    assert result["rc"] == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    text = config["text_config"]
    assert text["model_type"] == "qwen3_moe" and text["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (text["num_experts"], text["num_experts_per_tok"], text["moe_intermediate_size"]) == (4, 2, 48)
    assert text["norm_topk_prob"] is True and text["mlp_only_layers"] == [] and text["head_dim"] == 32
    model, info = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, output_loading_info=True
    )
    assert isinstance(model, InternVLForConditionalGeneration)
    assert type(model.model.language_model).__name__ == "Qwen3MoeModel"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = model(**result["inputs"]).logits
    diff = (logits - result["logits"]).abs().max().item()
    print(f"max |logit diff| transformers (InternVL + Qwen3-MoE) vs megatron: {diff:.2e}")
    assert diff <= ATOL
    assert torch.equal(logits.argmax(-1), result["logits"].argmax(-1))
    generated = model.generate(**result["inputs"], max_new_tokens=4, do_sample=False)
    assert 1 <= generated.shape[1] - result["inputs"]["input_ids"].shape[1] <= 4
