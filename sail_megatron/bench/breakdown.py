"""Step-time breakdown from megatron-core's own timers (the pipeline schedules, gradient finalization
and the optimizer already call them) plus forward hooks on the vision encoder and projector.

Timers synchronize the device at every start and stop, which removes overlap: the benchmark reports
throughput from steps run without them and the breakdown from separate, timed steps.
"""

from typing import Dict, List

import torch
from megatron.core.timers import Timers

from sail_megatron.training.collectives import max_over_world

VISION = "vision-forward"
# Our name -> megatron-core timer names summed into it.
PHASES = {
    "forward": ["forward-compute"],
    "backward": ["backward-compute"],
    "pipeline_p2p": [
        "forward-recv",
        "forward-send",
        "backward-recv",
        "backward-send",
        "forward-send-backward-recv",
        "backward-send-forward-recv",
    ],
    "grad_sync": ["all-grads-sync", "embedding-grads-all-reduce", "non-tensor-parallel-grads-all-reduce"],
    "optimizer": [
        "optimizer-copy-to-main-grad",
        "optimizer-unscale-and-check-inf",
        "optimizer-clip-main-grad",
        "optimizer-count-zeros",
        "optimizer-inner-step",
        "optimizer-copy-main-to-model-params",
    ],
    "param_gather": ["params-all-gather"],
}


class StepTimers:
    """Attach to model chunks and optimizer; `enabled` switches all timing on or off."""

    def __init__(self, chunks: List[torch.nn.Module], optimizer):
        self.timers = Timers(log_level=2, log_option="max")
        self.chunks, self.optimizer = chunks, optimizer
        self._hooks = []

    def enable(self) -> None:
        for chunk in self.chunks:
            chunk.config.timers = self.timers
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            opt.config.timers = self.timers
        model = getattr(self.chunks[0], "module", self.chunks[0])
        # The ViT and projector run inside "forward-compute": timed apart so the language share shows.
        for part in (getattr(model, "vision_model", None), getattr(model, "projector", None)):
            if part is not None:
                self._hooks.append(part.register_forward_pre_hook(lambda *_: self.timers(VISION, 0).start()))
                self._hooks.append(part.register_forward_hook(lambda *_: self.timers(VISION, 0).stop()))

    def disable(self) -> None:
        for chunk in self.chunks:
            chunk.config.timers = None
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            opt.config.timers = None
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def read(self, steps: int, data_wait_s: float) -> Dict[str, float]:
        """Seconds per step by phase, the max over ranks (the slowest rank sets the pace); resets.
        `data_wait_s` is this rank's time in the data iterator: our forward step fetches its batch, so
        megatron's "forward-compute" includes it and it is moved to its own phase."""
        names = sorted({n for group in PHASES.values() for n in group} | {VISION})
        local = [data_wait_s]
        for name in names:
            timer = self.timers._timers.get(name)
            local.append(timer.elapsed(reset=True) if timer is not None else 0.0)
        wait, *rest = (v / steps for v in max_over_world(local))
        by_name = dict(zip(names, rest))
        by_name["forward-compute"] = max(by_name["forward-compute"] - data_wait_s / steps, 0.0)
        out = {phase: sum(by_name[n] for n in group) for phase, group in PHASES.items()}
        out["data_wait"] = wait
        out["vision_forward"] = by_name[VISION]
        out["language_forward"] = max(out.pop("forward") - out["vision_forward"], 0.0)
        return out
