"""Rank functions for the layer-backend contract tests (module level: spawned ranks import them)."""

from pathlib import Path
from typing import Dict, List

import torch

from sail_megatron.config import ParallelConfig, PrecisionConfig
from sail_megatron.data.synthetic import IMG_CONTEXT
from sail_megatron.model.build import build_model
from sail_megatron.model.presets import get_preset
from sail_megatron.platform import destroy_distributed, init_distributed
from sail_megatron.training.checkpoint import load_checkpoint, save_checkpoint
from sail_megatron.training.checkpoint_files import CheckpointError
from tests.helpers.te_contract import make_te_shaped

LOCAL = PrecisionConfig(dtype="fp32", layers="local")


def _model(preset: str, te_shaped: bool = False, seed: int = 0):
    cfg = get_preset(preset)
    cfg.image_context_token_id = IMG_CONTEXT
    torch.manual_seed(seed)
    model = build_model(cfg, ParallelConfig(), LOCAL)
    with torch.no_grad():  # every weight distinct per seed, norms included
        for p in model.parameters():
            p.normal_()
    names = make_te_shaped(model) if te_shaped else []
    return model, names


def _weights(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.numel()}


def _differences(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> List[str]:
    return sorted(k for k in a if k not in b or not torch.equal(a[k], b[k]))


def cross_backend_round_trip(preset: str, root: str) -> dict:
    """local -> TE-shaped -> local through the training loader (resume, run.init_from) and the converter's
    (sail-convert, sail-chat); each load must give back every written weight exactly."""
    from sail_megatron.convert.mcore_io import build_empty_model, load_model

    root = Path(root)
    init_distributed(ParallelConfig(), seed=3)
    try:
        local, _ = _model(preset, seed=1)
        save_checkpoint(root / "local", 1, [local])
        written = _weights(local)

        te, names = _model(preset, te_shaped=True, seed=2)
        load_checkpoint(root / "local", [te])
        out = {"te_norms": names, "local_into_te": _differences(written, _weights(te))}

        empty = build_empty_model(te.model_config, "fp32")
        make_te_shaped(empty)
        load_model(empty, root / "local")
        out["local_into_te_converter"] = _differences(written, _weights(empty))

        save_checkpoint(root / "te", 1, [te])
        written_te = _weights(te)
        back, _ = _model(preset, seed=3)
        load_checkpoint(root / "te", [back])
        out["te_into_local"] = _differences(written_te, _weights(back))
        empty = build_empty_model(te.model_config, "fp32")
        load_model(empty, root / "te")
        out["te_into_local_converter"] = _differences(written_te, _weights(empty))
        out["te_extra_states_written"] = sum(
            1 for k in te.sharded_state_dict() if k.endswith("_extra_state") and k.rsplit(".", 2)[-2] in _last(names)
        )
        return out
    finally:
        destroy_distributed()


def _last(names: List[str]) -> set:
    return {n.rsplit(".", 1)[-1] for n in names}


def missing_weight_is_an_error(root: str) -> str:
    """A weight the checkpoint lacks is still refused, by name, while extra states may be absent."""
    root = Path(root)
    init_distributed(ParallelConfig(), seed=3)
    try:
        local, _ = _model("tiny-sail-vl2", seed=1)
        save_checkpoint(root, 1, [local])
        te, _ = _model("tiny-sail-vl2", te_shaped=True, seed=2)
        te.language_model.decoder.final_layernorm.register_parameter("gain", torch.nn.Parameter(torch.ones(4)))
        try:
            load_checkpoint(root, [te])
        except CheckpointError as e:
            return str(e)
        return "loaded"
    finally:
        destroy_distributed()


def module_tree_of_local_build(preset: str) -> dict:
    """Build with local layers while megatron's import-time defaults point at other norms (as on a node
    where Transformer Engine or apex imports): the tree must not change."""
    import megatron.core.models.backends as backends
    import megatron.core.models.gpt.gpt_layer_specs as gpt_specs
    import megatron.core.transformer.transformer_block as block

    class ImportableDefault(torch.nn.Module):  # what TE or apex would have put there
        def __init__(self, *args, **kwargs):
            super().__init__()

    block.LayerNormImpl = ImportableDefault
    backends.LNImpl = ImportableDefault
    gpt_specs.LNImpl = ImportableDefault
    init_distributed(ParallelConfig(), seed=3)
    try:
        model, _ = _model(preset)
        classes = {name: f"{type(m).__module__}.{type(m).__qualname__}" for name, m in model.named_modules()}
        return {
            "defaults": [n for n, c in classes.items() if "ImportableDefault" in c],
            "te_modules": [n for n, c in classes.items() if "transformer_engine" in c],
            "final_norm": classes["language_model.decoder.final_layernorm"],
        }
    finally:
        destroy_distributed()
