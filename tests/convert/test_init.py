"""`sail-convert init`: a stage-1 checkpoint from separate language and vision folders, with a new projector.

Qwen2 + InternViT, and Qwen3 + AIMv2 with the AIMv2 folder in both namings (apple/ml-aim's, and
transformers' `Aimv2VisionModel` as `save_pretrained` writes it, attention-pooling head included).
"""

import json
import time

import pytest
import torch

from sail_megatron.convert.hf_io import SafetensorsFolder
from sail_megatron.convert.hf_reference import InternVLChatReference
from tests.convert import fixtures as F
from tests.convert import workers
from tests.helpers.multiprocess import run_on_ranks


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    modules = F.build_modules(F.Spec(seed=20))
    F.write_standalone(root / "qwen", root / "vit", modules)
    aim = F.build_modules(AIM_SPEC)
    F.write_standalone(root / "qwen3", root / "aim", aim)
    F.write_standalone(None, root / "aim_hf", aim, transformers_names=True)
    jobs = [
        dict(
            op="init",
            llm_dir=str(root / "qwen"),
            vision_dir=str(root / "vit"),
            out_dir=str(root / "stage1"),
            tp=2,
            select_layer=-2,
            seed=5,
        ),
        dict(op="read_params", ckpt=str(root / "stage1")),
        dict(op="mcore_to_hf", ckpt=str(root / "stage1"), out_dir=str(root / "hf")),
        # ml-aim names, TP 2, select_layer -2 (the last block and post_trunk_norm are carried)
        dict(
            op="init",
            llm_dir=str(root / "qwen3"),
            vision_dir=str(root / "aim"),
            out_dir=str(root / "aim_stage1"),
            tp=2,
            select_layer=-2,
            seed=5,
        ),
        dict(op="read_params", ckpt=str(root / "aim_stage1")),
        dict(op="mcore_to_hf", ckpt=str(root / "aim_stage1"), out_dir=str(root / "aim_export")),
        # transformers names, PP 2, the default select_layer (-1 for AIMv2)
        dict(
            op="init",
            llm_dir=str(root / "qwen3"),
            vision_dir=str(root / "aim_hf"),
            out_dir=str(root / "aim_hf_stage1"),
            pp=2,
            seed=5,
        ),
        dict(op="read_params", ckpt=str(root / "aim_hf_stage1")),
        dict(op="mcore_to_hf", ckpt=str(root / "aim_hf_stage1"), out_dir=str(root / "aim_hf_export")),
    ]
    began = time.perf_counter()
    made, params, exported, *aim_results = run_on_ranks(workers.convert_many, 1, jobs)[0]
    print(f"3 inits + 3 exports: {time.perf_counter() - began:.1f} s")
    assert made["ok"] and exported["ok"], (made, exported)
    aim_made, aim_params, aim_exported, hf_made, hf_params, hf_exported = aim_results
    assert all(r["ok"] for r in (aim_made, aim_exported, hf_made, hf_exported)), aim_results
    return {
        "root": root,
        "modules": modules,
        "params": params,
        "aim": aim,
        "aim_params": aim_params,
        "aim_hf_params": hf_params,
    }


AIM_SPEC = F.Spec(vision_arch="aimv2", vision_head=True, llm_arch="qwen3", head_dim=32, tied=True, seed=21)


def _read(folder, prefix=""):
    with SafetensorsFolder(folder) as f:
        return {prefix + n: f.read(n) for n in f.tensors}


def test_vision_and_language_weights_come_from_their_releases(run):
    root = run["root"]
    exported = _read(root / "hf")
    sources = {**_read(root / "vit", "vision_model."), **_read(root / "qwen", "language_model.")}
    for name, tensor in sources.items():
        assert torch.equal(exported[name], tensor), name  # all 3 ViT layers, though only 2 are built
    assert sorted(n for n in exported if n.startswith("mlp1.")) == [
        f"mlp1.{i}.{wb}" for i in (0, 1, 3) for wb in ("bias", "weight")
    ]
    built = {n.split(".")[3] for n in run["params"] if n.startswith("vision_model.decoder.layers.")}
    assert built == {"0", "1"}


def test_projector_is_freshly_initialized(run):
    p = run["params"]
    assert torch.equal(p["projector.layer_norm.weight"], torch.ones(128))
    assert not p["projector.layer_norm.bias"].any()
    assert not p["projector.mlp.encoder.linear_fc1.bias"].any() and not p["projector.mlp.encoder.linear_fc2.bias"].any()
    assert abs(p["projector.mlp.encoder.linear_fc1.weight"].std().item() - 0.02) < 0.004
    assert abs(p["projector.mlp.encoder.linear_fc2.weight"].std().item() - 0.02 / 2**0.5) < 0.003


def test_exported_config_and_files(run):
    root = run["root"]
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["model_type"] == "internvl_chat" and config["select_layer"] == -2
    assert (config["ps_version"], config["downsample_ratio"], config["template"]) == ("v2", 0.5, "internvl2_5")
    assert config["llm_config"] == json.loads((root / "qwen" / "config.json").read_text())
    assert config["vision_config"] == json.loads((root / "vit" / "config.json").read_text())
    assert (root / "hf" / "tokenizer.json").read_bytes() == (root / "qwen" / "tokenizer.json").read_bytes()
    record = run["params"]["__record__"]
    assert record["tool"] == "init" and record["vocab_rows"] == 512 and record["target_tp"] == 2
    assert record["model"]["image_context_token_id"] == F.IMG_CONTEXT_ID  # looked up in the tokenizer


def test_exported_model_keeps_the_language_model(run):
    ids, _ = F.sample_inputs(run["modules"].spec, tiles=0)
    got = InternVLChatReference.from_folder(run["root"] / "hf")(ids)
    with torch.no_grad():
        want = run["modules"].qwen(ids).logits
    assert torch.equal(got, want)


def test_aimv2_and_qwen3_weights_come_from_their_releases(run):
    root = run["root"]
    exported = _read(root / "aim_export")
    sources = {**_read(root / "aim", "vision_model."), **_read(root / "qwen3", "language_model.")}
    assert sorted(n for n in exported if not n.startswith("mlp1.")) == sorted(sources)
    for name, tensor in sources.items():
        assert torch.equal(exported[name], tensor), name  # all 3 blocks and post_trunk_norm, though 2 are built
    built = {n.split(".")[3] for n in run["aim_params"] if n.startswith("vision_model.decoder.layers.")}
    assert built == {"0", "1"} and "vision_model.final_layernorm.weight" not in run["aim_params"]
    unused = run["aim_params"]["__record__"]["unused_tensors"]
    assert "vision_model.trunk.post_trunk_norm.weight" in unused and len(unused) == 8


def test_aimv2_in_transformers_names_gives_the_same_checkpoint(run):
    root = run["root"]
    # Same modules, same projector seed: the export (under ml-aim names, head left out) is the same tensors.
    ml_aim, transformers_named = _read(root / "aim_export"), _read(root / "aim_hf_export")
    assert sorted(transformers_named) == sorted(ml_aim)
    assert all(torch.equal(transformers_named[n], t) for n, t in ml_aim.items())
    params = run["aim_hf_params"]
    assert "vision_model.final_layernorm.weight" in params, "select_layer defaults to -1 for AIMv2"
    assert not params["__record__"]["unused_tensors"]
    assert torch.equal(
        params["vision_model.position_embedding"][0], run["aim"].vit.embeddings.position_embedding.weight
    )


def test_aimv2_exported_configs(run):
    root = run["root"]
    config = json.loads((root / "aim_export" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("sailvl", ["SAILVLModel"])  # SAIL-VL2's layout
    assert config["select_layer"] == -2
    assert config["llm_config"] == json.loads((root / "qwen3" / "config.json").read_text())
    assert config["vision_config"] == json.loads((root / "aim" / "config.json").read_text())
    native = json.loads((root / "aim_hf_export" / "config.json").read_text())
    vision = native["vision_config"]  # transformers' Aimv2VisionConfig as ml-aim's AIMv2Config
    assert (vision["model_type"], vision["architectures"], vision["use_bias"]) == ("aimv2", ["AIMv2Model"], False)
    assert not {"use_head", "is_native", "mlp_bias"} & set(vision)
    assert native["select_layer"] == -1
    ours = {k: vision[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
    assert ours == {k: config["vision_config"][k] for k in ours}


def test_aimv2_export_keeps_the_qwen3_language_model(run):
    ids, _ = F.sample_inputs(AIM_SPEC, tiles=0)
    got = InternVLChatReference.from_folder(run["root"] / "aim_export")(ids)
    with torch.no_grad():
        want = run["aim"].qwen(ids).logits
    assert torch.equal(got, want)
