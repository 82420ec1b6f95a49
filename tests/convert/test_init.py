"""`sail-convert init`: a stage-1 checkpoint from separate Qwen2 and InternViT folders, with a new projector."""

import json

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
    ]
    made, params, exported = run_on_ranks(workers.convert_many, 1, jobs)[0]
    assert made["ok"] and exported["ok"], (made, exported)
    return {"root": root, "modules": modules, "params": params}


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
