"""HF -> megatron -> HF: bitwise tensors and an identical config.json, for the layouts that matter.

All conversions of this module run in one spawned process (a module fixture), in order; each test
then checks its own scenario's folders.
"""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from sail_megatron.convert.hf_io import SafetensorsFolder
from sail_megatron.convert.hf_reference import InternVLChatReference
from sail_megatron.convert.mcore_io import HF_SOURCE_DIR, UNUSED_TENSORS_FILE
from tests.convert import fixtures as F
from tests.convert import workers
from tests.helpers.multiprocess import run_on_ranks

SPECS = {
    # untied lm_head, one unused ViT layer, ps v1, fp32, vocabulary padded for TP 2 (300 -> 512 rows)
    "untied": F.Spec(select_layer=-2, ps_version="v1"),
    "tied": F.Spec(tied=True, dtype=torch.bfloat16, seed=1),
    # tied, but the release also stores lm_head; select_layer counted from the front
    "tied_stored": F.Spec(tied=True, lm_head_stored=True, select_layer=1, dtype=torch.bfloat16, seed=2),
    "bf16": F.Spec(select_layer=-3, dtype=torch.bfloat16, seed=3),
    # SAIL-VL-1.6 layout (AIMv2 + Qwen2), TP 2: select_layer -2 leaves the last block and post_trunk_norm unused.
    "sail16": F.Spec(vision_arch="aimv2", select_layer=-2, seed=5),
    # SAIL-VL2 layout (AIMv2 + Qwen3), PP 2: tied embeddings with lm_head stored too (as SAIL-VL2-2B ships),
    # head_dim 32 x 4 heads != hidden 64.
    "sail2": F.Spec(vision_arch="aimv2", llm_arch="qwen3", head_dim=32, tied=True, lm_head_stored=True, seed=6),
}
AIMV2 = ("sail16", "sail2")


def _read_all(folder: Path):
    with SafetensorsFolder(folder) as f:
        return {n: f.read(n) for n in f.tensors}


def _config(folder: Path):
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    modules = {name: F.build_modules(spec) for name, spec in SPECS.items()}
    for name, m in modules.items():
        F.write_chat_checkpoint(root / name / "hf", m)
    # A tied release whose stored lm_head is not the embedding: fails after the model is built.
    bad = root / "bad_tie" / "hf"
    F.write_chat_checkpoint(bad, F.build_modules(F.Spec(tied=True, lm_head_stored=True, seed=4)))
    F.edit_tensors(bad, lambda t: {**t, "language_model.lm_head.weight": t["language_model.lm_head.weight"] + 1})
    jobs = [
        dict(op="hf_to_mcore", hf_dir=str(root / "untied/hf"), out_dir=str(root / "untied/mcore"), tp=2),
        dict(op="mcore_to_hf", ckpt=str(root / "untied/mcore"), out_dir=str(root / "untied/hf2")),
        dict(op="read_params", ckpt=str(root / "untied/mcore")),
    ]
    for name in ("tied", "tied_stored", "sail2"):
        jobs += [
            dict(op="hf_to_mcore", hf_dir=str(root / name / "hf"), out_dir=str(root / name / "mcore"), pp=2),
            dict(op="mcore_to_hf", ckpt=str(root / name / "mcore"), out_dir=str(root / name / "hf2")),
        ]
    jobs += [
        dict(op="hf_to_mcore", hf_dir=str(root / "sail16/hf"), out_dir=str(root / "sail16/mcore"), tp=2),
        dict(op="mcore_to_hf", ckpt=str(root / "sail16/mcore"), out_dir=str(root / "sail16/hf2")),
        dict(op="read_params", ckpt=str(root / "sail16/mcore")),
    ]
    jobs += [  # the third-party reference (transformers' Aimv2VisionModel, Qwen2/Qwen3ForCausalLM) vs our model
        dict(op="verify", hf_dir=str(root / name / "hf"), ckpt=str(root / name / "mcore"), atol=1e-4, min_top1=1.0)
        for name in AIMV2
    ]
    jobs += [  # bf16 release -> fp32 checkpoint -> bf16 export (exact) and fp32 export
        dict(op="hf_to_mcore", hf_dir=str(root / "bf16/hf"), out_dir=str(root / "bf16/mcore"), dtype="fp32"),
        dict(op="mcore_to_hf", ckpt=str(root / "bf16/mcore"), out_dir=str(root / "bf16/hf2"), dtype="bf16"),
        dict(op="mcore_to_hf", ckpt=str(root / "bf16/mcore"), out_dir=str(root / "bf16/hf_fp32")),
        dict(op="read_params", ckpt=str(root / "bf16/mcore")),
        dict(op="hf_to_mcore", hf_dir=str(bad), out_dir=str(root / "bad_tie/mcore")),
    ]
    # A checkpoint without its carried ViT layers (as after training): exported with and without --base-hf.
    jobs_after = [
        dict(op="mcore_to_hf", ckpt=str(root / "dropped/mcore"), out_dir=str(root / "dropped/hf2")),
        dict(
            op="mcore_to_hf",
            ckpt=str(root / "dropped/mcore"),
            out_dir=str(root / "dropped/hf3"),
            base_hf=str(root / "untied/hf"),
        ),
    ]
    # The same for AIMv2: a shorter AIMv2 is not the same model, so the export needs --base-hf.
    jobs_after += [
        dict(op="mcore_to_hf", ckpt=str(root / "dropped_aim/mcore"), out_dir=str(root / "dropped_aim/hf2")),
        dict(
            op="mcore_to_hf",
            ckpt=str(root / "dropped_aim/mcore"),
            out_dir=str(root / "dropped_aim/hf3"),
            base_hf=str(root / "sail16/hf"),
        ),
    ]
    began = time.perf_counter()
    (results,) = run_on_ranks(workers.convert_many, 1, jobs)
    print(f"roundtrip conversions: {time.perf_counter() - began:.1f} s for {len(jobs)} jobs")
    for name in ("dropped", "dropped_aim"):
        shutil.copytree(root / ("untied" if name == "dropped" else "sail16") / "mcore", root / name / "mcore")
        (root / name / "mcore" / HF_SOURCE_DIR / UNUSED_TENSORS_FILE).unlink()
    # A trainer checkpoint (run folder with config.yaml, no conversion record), exported with and without --base-hf.
    jobs_after += [
        dict(op="as_trainer_run", ckpt=str(root / "untied/mcore"), run_dir=str(root / "run")),
        dict(op="mcore_to_hf", ckpt=str(root / "run"), out_dir=str(root / "run_hf"), base_hf=str(root / "untied/hf")),
        dict(op="mcore_to_hf", ckpt=str(root / "run"), out_dir=str(root / "run_hf_bare")),
    ]
    (after,) = run_on_ranks(workers.convert_many, 1, jobs_after)
    return {"root": root, "modules": modules, "results": results + after, "jobs": jobs + jobs_after}


def _result(runs, op: str, out: str):
    for job, result in zip(runs["jobs"], runs["results"]):
        if job["op"] == op and job.get("out_dir", job.get("ckpt")).endswith(out):
            return result
    raise KeyError(out)


@pytest.mark.parametrize("name", ["untied", "tied", "tied_stored", *AIMV2])
def test_round_trip_is_bitwise_with_identical_config(runs, name):
    root = runs["root"] / name
    for op, out in (("hf_to_mcore", f"{name}/mcore"), ("mcore_to_hf", f"{name}/hf2")):
        assert _result(runs, op, out)["ok"], _result(runs, op, out)
    before, after = _read_all(root / "hf"), _read_all(root / "hf2")
    assert sorted(after) == sorted(before)
    for n, t in before.items():
        assert after[n].dtype == t.dtype and torch.equal(after[n], t), n
    assert _config(root / "hf2") == _config(root / "hf")
    assert (root / "hf2" / "config.json").read_bytes() == (root / "hf" / "config.json").read_bytes()
    code = "modeling_sailvl.py" if name in AIMV2 else "modeling_internvl_chat.py"
    for carried in ("tokenizer.json", "tokenizer_config.json", code):
        assert (root / "hf2" / carried).read_bytes() == (root / "hf" / carried).read_bytes()


def test_vocabulary_is_padded_for_tp_and_unpadded_on_export(runs):
    params = _result(runs, "read_params", "untied/mcore")
    record = params["__record__"]
    assert record["target_tp"] == 2 and record["vocab_rows"] == 512  # 300 rounded up to 128 x TP 2
    for name in ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight"):
        w = params[name]
        assert w.shape == (512, 64) and not w[300:].any() and w[:300].abs().sum() > 0
    exported = _read_all(runs["root"] / "untied/hf2")
    assert exported["language_model.model.embed_tokens.weight"].shape == (300, 64)
    assert exported["language_model.lm_head.weight"].shape == (300, 64)


def test_select_layer_truncates_the_model_and_carries_the_rest(runs):
    params = _result(runs, "read_params", "untied/mcore")
    vision_layers = {n.split(".")[3] for n in params if n.startswith("vision_model.decoder.layers.")}
    assert vision_layers == {"0", "1"}, "select_layer -2 of 3 layers builds 2"
    assert params["__record__"]["unused_tensors"] and all(
        ".layers.2." in n for n in params["__record__"]["unused_tensors"]
    )


def test_bf16_release_through_fp32_checkpoint(runs):
    root = runs["root"] / "bf16"
    params = _result(runs, "read_params", "bf16/mcore")
    assert params["language_model.decoder.final_layernorm.weight"].dtype == torch.float32
    before, back = _read_all(root / "hf"), _read_all(root / "hf2")
    assert all(back[n].dtype == torch.bfloat16 and torch.equal(back[n], t) for n, t in before.items())
    assert _config(root / "hf2") == _config(root / "hf")
    wide = _read_all(root / "hf_fp32")
    assert all(wide[n].dtype == torch.float32 and torch.equal(wide[n], t.float()) for n, t in before.items())
    assert _config(root / "hf_fp32")["torch_dtype"] == "float32"


def test_export_without_the_unused_layers_is_the_same_model(runs):
    root = runs["root"]
    dropped = _config(root / "dropped/hf2")
    assert dropped["vision_config"]["num_hidden_layers"] == 2 and dropped["select_layer"] == -1
    assert not any(".layers.2." in n for n in _read_all(root / "dropped/hf2"))
    modules = runs["modules"]["untied"]
    ids, pixels = F.sample_inputs(modules.spec)
    expected = F.expected_logits(modules, ids, pixels)
    for folder in ("untied/hf", "dropped/hf2"):
        got = InternVLChatReference.from_folder(root / folder)(ids, pixels, F.IMG_CONTEXT_ID)
        assert (got - expected).abs().max() < 1e-5, folder
    # --base-hf supplies them again: bitwise the original release.
    original, restored = _read_all(root / "untied/hf"), _read_all(root / "dropped/hf3")
    assert sorted(original) == sorted(restored) and all(torch.equal(restored[n], t) for n, t in original.items())
    assert _config(root / "dropped/hf3") == _config(root / "untied/hf")


def test_failure_after_the_model_is_built_leaves_nothing(runs):
    result = _result(runs, "hf_to_mcore", "bad_tie/mcore")
    assert not result["ok"] and "differs from the token embedding" in result["error"]
    assert not result["out_exists"] and not result["leftovers"]


def test_trainer_checkpoint_exports_with_base_hf(runs):
    root = runs["root"]
    assert _result(runs, "mcore_to_hf", "run_hf")["ok"], _result(runs, "mcore_to_hf", "run_hf")
    original, exported = _read_all(root / "untied/hf"), _read_all(root / "run_hf")
    assert sorted(original) == sorted(exported) and all(torch.equal(exported[n], t) for n, t in original.items())
    assert _config(root / "run_hf") == _config(root / "untied/hf")
    assert (root / "run_hf" / "modeling_internvl_chat.py").is_file()


def test_trainer_checkpoint_exports_alone(runs):
    # No record, no base: config.json is generated from the run's model config, unused ViT layers dropped.
    root = runs["root"]
    config = _config(root / "run_hf_bare")
    assert config["model_type"] == "internvl_chat" and config["llm_config"]["model_type"] == "qwen2"
    assert config["vision_config"]["num_hidden_layers"] == 2 and config["select_layer"] == -1
    modules = runs["modules"]["untied"]
    ids, pixels = F.sample_inputs(modules.spec)
    got = InternVLChatReference.from_folder(root / "run_hf_bare")(ids, pixels, F.IMG_CONTEXT_ID)
    assert (got - F.expected_logits(modules, ids, pixels)).abs().max() < 1e-5


def test_aimv2_select_layer_carries_the_last_block_and_the_final_norm(runs):
    params = _result(runs, "read_params", "sail16/mcore")
    vision_layers = {n.split(".")[3] for n in params if n.startswith("vision_model.decoder.layers.")}
    assert vision_layers == {"0", "1"}, "select_layer -2 of 3 blocks builds 2"
    assert "vision_model.final_layernorm.weight" not in params, "the final norm applies only at select_layer -1"
    unused = params["__record__"]["unused_tensors"]
    assert "vision_model.trunk.post_trunk_norm.weight" in unused
    assert sorted(unused) == sorted(
        [f"vision_model.trunk.blocks.2.{n}" for n in F.AIMV2_BLOCK_TENSORS]
        + ["vision_model.trunk.post_trunk_norm.weight"]
    )
    # Qwen2 keeps its qkv bias; the vision layers have none.
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.bias" in params
    assert not any(n.startswith("vision_model.") and n.endswith(".bias") and "patch_embedding" not in n for n in params)


@pytest.mark.parametrize("name", AIMV2)
def test_aimv2_checkpoints_match_the_transformers_reference(runs, name):
    (report,) = [r for j, r in zip(runs["jobs"], runs["results"]) if j["op"] == "verify" and f"/{name}/" in j["hf_dir"]]
    assert report.passed, report.format()
    assert [c.name for c in report.cases] == ["text", "image"]
    print(f"verify {name}: " + ", ".join(f"{c.name} {c.max_abs_diff:.2e}" for c in report.cases))


def test_aimv2_export_without_the_unused_tensors_asks_for_them(runs):
    root = runs["root"]
    refused = _result(runs, "mcore_to_hf", "dropped_aim/hf2")
    assert not refused["ok"] and "--base-hf" in refused["error"] and "post_trunk_norm" in refused["error"]
    assert not refused["out_exists"] and not refused["leftovers"]
    original, restored = _read_all(root / "sail16/hf"), _read_all(root / "dropped_aim/hf3")
    assert sorted(original) == sorted(restored) and all(torch.equal(restored[n], t) for n, t in original.items())
    assert _config(root / "dropped_aim/hf3") == _config(root / "sail16/hf")
