"""Give a model built with megatron-core's local layers the checkpoint shape of its Transformer Engine build.

TE cannot run here, so its module contract is emulated where it changes what a checkpoint holds, as read
against TE 2.9-2.11 and megatron-core 0.16:
- Standalone norms (`TENorm` -> `te.pytorch.RMSNorm`/`LayerNorm`, ops-based) always return an extra state
  (`BasicOperation.get_extra_state`, transformer_engine/pytorch/ops/op.py), which megatron saves as one
  ShardedObject per norm; megatron's local norms have none. Emulated by swapping each such norm's class
  for a subclass with `get_extra_state`/`set_extra_state`.
- Norms TE folds into the following linear (`TELayerNormColumnParallelLinear`: a layer's input and pre-MLP
  norms, the projector's norm) are checkpointed under the fused names by both builds (the specs' key
  maps), so they are left alone. Linears keep an extra state in both builds; TE's attention drops its own
  from the sharded state dict.
- A mixture-of-experts layer has no fc1 to fold its pre-MLP norm into: TE's MoE spec builds it as a
  standalone TENorm (`pre_mlp_layernorm.weight` plus an extra state; the local spec keeps that name too).
  Its experts (TE's grouped linears, megatron's SequentialMLP of local linears) and router write the same
  keys in both builds (`mlp.experts.experts.linear_fc{1,2}.{weight,_extra_state}`, one slice per expert).

Which norms stay standalone is read off the model: every torch norm not in FOLDED_INTO_LINEAR. When TE
builds another module differently, say so here (a rule or a position) and every contract test covers it.
"""

from typing import List

import torch

FOLDED_INTO_LINEAR = ("input_layernorm", "pre_mlp_layernorm", "projector.layer_norm")
"""Module names (last part, or a dotted suffix) of the norms TE fuses into the linear after them."""


class _TEExtraState:
    """What TE's ops-based norms add to a torch norm's state dict: an (empty) serialized extra state."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self.te_extra_state_loaded = True


class TEShapedRMSNorm(_TEExtraState, torch.nn.RMSNorm):
    pass


class TEShapedLayerNorm(_TEExtraState, torch.nn.LayerNorm):
    pass


def _folded(name: str) -> bool:
    return any(name == f or name.endswith("." + f) for f in FOLDED_INTO_LINEAR)


def _before_experts(modules: dict, name: str) -> bool:
    """A layer's pre-MLP norm whose MLP is megatron's MoELayer (TE keeps it standalone)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    parent, _, last = name.rpartition(".")
    return last == "pre_mlp_layernorm" and isinstance(getattr(modules.get(parent), "mlp", None), MoELayer)


def te_standalone_norms(model: torch.nn.Module) -> List[str]:
    """Names of the norms that the TE build of `model` makes as standalone TENorm modules."""
    modules = dict(model.named_modules())
    return [
        name
        for name, m in modules.items()
        if isinstance(m, (torch.nn.RMSNorm, torch.nn.LayerNorm))
        and (not _folded(name) or _before_experts(modules, name))
    ]


def make_te_shaped(model: torch.nn.Module) -> List[str]:
    """Swap, in place, each standalone norm of `model` (built with local layers) to its TE-shaped twin;
    returns their names. The weights and the forward stay the norms' own."""
    names = te_standalone_norms(model)
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        m.__class__ = TEShapedRMSNorm if isinstance(m, torch.nn.RMSNorm) else TEShapedLayerNorm
    return names
