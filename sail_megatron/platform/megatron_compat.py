"""Fixes for megatron-core 0.16's distributed optimizer on torch's Adam (no Transformer Engine or apex).

1. Loading a `fully_reshardable` optimizer checkpoint first restores `step` into every torch-Adam
   state (from the param groups), then copies each state tensor from the checkpoint, which holds no
   `step`: KeyError. The patched copy skips exactly that key (already restored).
2. `state_dict()` asserts that the Adam state holds one `step`; a rank whose stage trains nothing (a
   frozen pipeline stage) has no state at all, so saving a checkpoint fails there. It reports step 0.
Both exist only on the no-TE/no-apex path, so the patches are installed only there.
"""

import functools

import torch

_installed = False


def install_torch_adam_checkpoint_fix() -> None:
    global _installed
    if _installed:
        return
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        main_param = self.optimizer.param_groups[self.model_param_group_index_map[model_param][0]]["params"][
            self.model_param_group_index_map[model_param][1]]
        step = self.optimizer.state[main_param].pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                self.optimizer.state[main_param]["step"] = step

    cls._set_main_param_and_optimizer_states = set_states

    original_state_dict = cls.state_dict

    @functools.wraps(original_state_dict)
    def state_dict(self):
        inner = self.optimizer
        if inner.state:
            return original_state_dict(self)
        plain = inner.state_dict
        # Nothing on this rank has trained: describe it as step 0 (the "state" entry is dropped again).
        inner.state_dict = lambda: {**plain(), "state": {0: {"step": torch.tensor(0.0)}}}
        try:
            return original_state_dict(self)
        finally:
            del inner.state_dict

    cls.state_dict = state_dict
    _installed = True


def unshare_adam_steps(optimizer) -> None:
    """After a load, megatron-core 0.16 gives every torch-Adam parameter the *same* `step` tensor; Adam
    increments it in place per parameter, so the bias correction would drift. Give each its own copy."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
