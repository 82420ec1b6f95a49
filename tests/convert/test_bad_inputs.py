"""Bad input: a clear error listing every problem, and no output folder (nor a partial one) left behind.

These checks run before any process group or model exists, so they run here in pytest's process.
(A failure after the model is built is tested in test_roundtrip.py.)
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from sail_megatron.convert.errors import ConversionError
from sail_megatron.convert.init_stage1 import init_stage1
from sail_megatron.convert.to_hf import mcore_to_hf
from sail_megatron.convert.to_mcore import hf_to_mcore
from sail_megatron.training.checkpoint_files import CheckpointError
from tests.convert import fixtures as F

QKV = "language_model.model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    spec = F.Spec()
    modules = F.build_modules(spec)
    root = tmp_path_factory.mktemp("good")
    F.write_chat_checkpoint(root / "hf", modules)
    F.write_standalone(root / "qwen", root / "vit", modules)
    return root


def _copy(good: Path, tmp_path: Path, name: str = "hf") -> Path:
    shutil.copytree(good / name, tmp_path / name)
    return tmp_path / name


def _fails(tmp_path: Path, call, *needles: str) -> str:
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        call(out)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    assert not out.exists(), "no output folder after an error"
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name], "no partial folder either"
    return message


def test_missing_tensor(good, tmp_path):
    hf = _copy(good, tmp_path)
    F.edit_tensors(hf, lambda t: {n: v for n, v in t.items() if n != QKV})
    _fails(tmp_path, lambda out: hf_to_mcore(hf, out), f"missing tensor: {QKV} (expected shape [64, 64])")


def test_extra_tensor(good, tmp_path):
    hf = _copy(good, tmp_path)
    F.edit_tensors(hf, lambda t: {**t, "vision_model.encoder.layers.0.attn.q_norm.weight": torch.ones(32)})
    _fails(
        tmp_path,
        lambda out: hf_to_mcore(hf, out),
        "unexpected tensor: vision_model.encoder.layers.0.attn.q_norm.weight",
    )


def test_wrong_shape(good, tmp_path):
    hf = _copy(good, tmp_path)
    F.edit_tensors(hf, lambda t: {**t, QKV: t[QKV][:32]})
    _fails(tmp_path, lambda out: hf_to_mcore(hf, out), f"wrong shape: {QKV} is [32, 64], the config implies [64, 64]")


def test_all_tensor_problems_are_listed_together(good, tmp_path):
    hf = _copy(good, tmp_path)
    F.edit_tensors(
        hf,
        lambda t: {
            **{n: v for n, v in t.items() if not n.startswith("mlp1.")},
            "extra.weight": torch.zeros(1),
            QKV: t[QKV][:32],
        },
    )
    message = _fails(tmp_path, lambda out: hf_to_mcore(hf, out), "8 problem(s)", "extra.weight", "mlp1.3.bias")
    assert message.count("missing tensor") == 6


def test_unknown_model_type(good, tmp_path):
    hf = _copy(good, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    _fails(tmp_path, lambda out: hf_to_mcore(hf, out), "model_type is 'qwen2_vl', expected 'internvl_chat'")


def test_tp_that_does_not_divide_the_heads(good, tmp_path):
    message = _fails(
        tmp_path,
        lambda out: hf_to_mcore(good / "hf", out, tp=3),
        "TP 3 does not divide the language num_attention_heads (4)",
        "TP 3 does not divide the vision num_attention_heads (4)",
    )
    assert "5 problem(s)" in message and "PP 1 does not divide" not in message
    _fails(tmp_path, lambda out: hf_to_mcore(good / "hf", out, pp=3), "PP 3 does not divide the 2 language layers")


def test_truncated_file(good, tmp_path):
    hf = _copy(good, tmp_path)
    shard = hf / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails(tmp_path, lambda out: hf_to_mcore(hf, out), "the file is truncated")


def test_pytorch_bin_checkpoints_are_named(good, tmp_path):
    hf = tmp_path / "bin"
    hf.mkdir()
    shutil.copy(good / "hf" / "config.json", hf)
    (hf / "pytorch_model.bin").write_bytes(b"")
    _fails(tmp_path, lambda out: hf_to_mcore(hf, out), "no safetensors files", "pytorch_model.bin")


def test_existing_output_is_not_overwritten(good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        hf_to_mcore(good / "hf", out)
    assert (out / "keep.txt").read_text() == "mine"


def test_export_of_a_folder_that_is_no_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        mcore_to_hf(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_init_reports_problems_of_both_folders(good, tmp_path):
    qwen, vit = _copy(good, tmp_path, "qwen"), _copy(good, tmp_path, "vit")
    F.edit_tensors(qwen, lambda t: {n: v for n, v in t.items() if n != "model.norm.weight"})
    F.edit_tensors(vit, lambda t: {**t, "encoder.layers.0.ls1": torch.ones(7)})
    _fails(
        tmp_path,
        lambda out: init_stage1(qwen, vit, out, select_layer=-1),
        "2 problem(s)",
        "missing tensor in",
        "model.norm.weight",
        "wrong shape in",
        "encoder.layers.0.ls1 is [7]",
    )


# ------------------------------------------------------------------------------ SAIL-VL-1.6 / SAIL-VL2


@pytest.fixture(scope="module")
def good_aim(tmp_path_factory):
    """A SAIL-VL2-layout folder (AIMv2 + Qwen3) and the standalone folders: Qwen3, AIMv2 saved by transformers."""
    spec = F.Spec(vision_arch="aimv2", llm_arch="qwen3", head_dim=32, tied=True)
    modules = F.build_modules(spec)
    root = tmp_path_factory.mktemp("good_aim")
    F.write_chat_checkpoint(root / "hf", modules)
    F.write_standalone(root / "qwen", root / "aim_hf", modules, transformers_names=True)
    return root


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_aimv2_and_moe_problems_are_listed_together(good_aim, tmp_path):
    hf = _copy(good_aim, tmp_path)

    def edit(config):
        config["vision_config"].update(qkv_bias=True, use_bias=True)
        # Another MoE family (Qwen3-MoE converts; tests/convert/test_moe.py)
        config["llm_config"].update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=8)

    _edit_config(hf, edit)
    _fails(
        tmp_path,
        lambda out: hf_to_mcore(hf, out),
        "3 problem(s)",
        "vision_config.qkv_bias is true",
        "vision_config.use_bias is true",
        "a mixture-of-experts language model: only Qwen2ForCausalLM",
    )


def test_aimv2_missing_tensor_is_named(good_aim, tmp_path):
    hf = _copy(good_aim, tmp_path)
    gone = "vision_model.trunk.blocks.1.mlp.fc3.weight"
    F.edit_tensors(hf, lambda t: {n: v for n, v in t.items() if n != gone})
    _fails(tmp_path, lambda out: hf_to_mcore(hf, out), f"missing tensor: {gone} (expected shape [64, 32])")


def test_init_refuses_native_resolution_aimv2(good_aim, tmp_path):
    vit = _copy(good_aim, tmp_path, "aim_hf")
    _edit_config(vit, lambda config: config.update(is_native=True))
    _fails(tmp_path, lambda out: init_stage1(good_aim / "qwen", vit, out), "is_native is true", "sin-cos")


def test_init_names_transformers_tensors_that_do_not_fit(good_aim, tmp_path):
    vit = _copy(good_aim, tmp_path, "aim_hf")
    F.edit_tensors(vit, lambda t: {n: v for n, v in t.items() if n != "encoder.layers.0.attention.k_proj.weight"})
    _fails(
        tmp_path,
        lambda out: init_stage1(good_aim / "qwen", vit, out),
        "missing tensor in",
        "trunk.blocks.0.attn.qkv.weight (expected shape [96, 32])",
        "unexpected tensor in",
        "encoder.layers.0.attention.q_proj.weight",
    )
