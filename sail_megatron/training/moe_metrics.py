"""How a mixture-of-experts language model routes: per-layer expert load, load-balancing loss, router entropy.

`MoeRouting` watches megatron-core's routers (`TopKRouter`) of this rank's model stage and, at each
`collect()`, reduces what they did since the previous one over the ranks that saw other tokens:

- Expert load: tokens routed to each expert per layer (each token counts k times, once per chosen
  expert), summed over the data-parallel ranks (which include the expert-parallel ones) and, under
  sequence parallelism, over the tensor-parallel ranks (each holds a slice of the sequence); without it
  every tensor-parallel rank routes the same tokens and is counted once. Layers live on one pipeline
  stage each; the per-layer figures are gathered over the pipeline so every rank returns all layers.
  Reported per layer as max / mean tokens per expert (1.0: perfectly balanced; k x experts / k = the
  worst case, every token on the same k experts), the normalized entropy of the load distribution
  (1.0: uniform; SAIL-VL2's "expert activation entropy"), and the experts that received no token.
- Router entropy: the entropy (nats) of each token's softmax over all experts, averaged over tokens and
  layers (log(experts) for a router that has not decided, 0 for a one-hot one). Taken from the logits
  the router computed (its `gating`), so it costs no extra GEMM.
- The load-balancing loss: megatron-core's own per-layer tracker (`save_to_aux_losses_tracker`, filled by
  the router when `moe_aux_loss_coeff` > 0), reduced by megatron's `reduce_aux_losses_tracker_across_ranks`
  (summed over the pipeline and the router's tensor/context group, averaged over data-parallel ranks) and
  averaged over the micro-batches each layer saw. It is the Switch loss without its coefficient
  (E x sum_i f_i P_i: 1.0 when balanced), as megatron logs `load_balancing_loss`; the z-loss likewise.

Only training forwards count (`module.training` with autograd on): a validation pass does not, and a
layer recomputed in the backward pass (its first forward ran without autograd) counts once, as
megatron's own aux-loss tracking does. `collect()` is collective over the data-parallel, tensor-parallel and
pipeline groups: every rank calls it at the same step.
"""

import math
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)
from megatron.core.transformer.moe.router import TopKRouter

from sail_megatron.config import ParallelConfig


def _routers(model_chunks: List[torch.nn.Module]) -> List[TopKRouter]:
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TopKRouter)]


class MoeRouting:
    """Routing statistics of this rank's MoE layers since the last `collect()` (see the module docstring)."""

    def __init__(self, model_chunks: List[torch.nn.Module], sequence_parallel: bool = False):
        self.routers = _routers(model_chunks)
        if not self.routers:
            raise ValueError("the model has no mixture-of-experts layers")
        config = self.routers[0].config
        self.num_layers, self.num_experts, self.topk = config.num_layers, config.num_moe_experts, config.moe_router_topk
        self.sequence_parallel = sequence_parallel
        device = self.routers[0].weight.device
        self._load = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=device)
        self._entropy = torch.zeros(self.num_layers, dtype=torch.float64, device=device)  # summed over tokens
        self._tokens = torch.zeros(self.num_layers, dtype=torch.float64, device=device)
        self._passes = torch.zeros(self.num_layers, dtype=torch.float64, device=device)  # micro-batches seen
        self._logits: Dict[int, torch.Tensor] = {}
        self._handles = []
        for router in self.routers:
            self._wrap_gating(router)
            self._handles.append(router.register_forward_hook(self._after_routing))

    @staticmethod
    def _counts(router: TopKRouter) -> bool:
        return router.training and torch.is_grad_enabled()

    def _wrap_gating(self, router: TopKRouter) -> None:
        """Keep the logits of the router's own gating GEMM for the entropy (an instance attribute shadows the
        method; `close()` removes it)."""
        gating = router.gating

        def gating_and_keep(input: torch.Tensor) -> torch.Tensor:
            logits = gating(input)
            if self._counts(router):
                self._logits[id(router)] = logits.detach()
            return logits

        router.gating = gating_and_keep

    def _after_routing(self, router: TopKRouter, args, output) -> None:
        logits = self._logits.pop(id(router), None)
        if not self._counts(router) or router.layer_number is None:
            return
        _, routing_map = output
        layer = router.layer_number - 1
        with torch.no_grad():
            self._load[layer] += routing_map.sum(dim=0).to(self._load.dtype)
            self._passes[layer] += 1
            if logits is not None:
                logp = torch.log_softmax(logits.reshape(-1, self.num_experts).double(), dim=-1)
                self._entropy[layer] += -(logp.exp() * logp).sum()
                self._tokens[layer] += logp.shape[0]

    def _token_groups(self) -> List[Any]:
        """Groups whose ranks routed different tokens: data parallel (expert-parallel ranks included), and
        tensor parallel under sequence parallelism."""
        groups = [parallel_state.get_data_parallel_group()]
        if self.sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1:
            groups.append(parallel_state.get_tensor_model_parallel_group())
        return groups

    def collect(self) -> Dict[str, Any]:
        """The window's statistics over every rank (collective: all ranks call it), then a new window."""
        load, entropy, tokens = self._load.clone(), self._entropy.clone(), self._tokens.clone()
        for group in self._token_groups():
            for t in (load, entropy, tokens):
                dist.all_reduce(t, group=group)
        passes = self._passes.clone()
        pipeline = parallel_state.get_pipeline_model_parallel_group()
        for t in (load, entropy, tokens):
            dist.all_reduce(t, group=pipeline)  # each layer is on one stage: the others add zeros
        dist.all_reduce(passes, op=dist.ReduceOp.MAX, group=pipeline)
        out = _load_figures(load, self.num_experts)
        seen = tokens > 0
        out["moe_router_entropy"] = float(entropy[seen].sum() / tokens[seen].sum()) if bool(seen.any()) else None
        out.update(self._tracked_losses(passes))
        for t in (self._load, self._entropy, self._tokens, self._passes):
            t.zero_()
        return out

    def _tracked_losses(self, passes: torch.Tensor) -> Dict[str, Any]:
        """megatron's per-layer aux-loss tracker, reduced its own way, averaged per micro-batch, then cleared."""
        tracker = get_moe_layer_wise_logging_tracker()
        names = {"load_balancing_loss": "moe_aux_loss", "z_loss": "moe_z_loss"}
        present = [n for n in names if n in tracker]
        out: Dict[str, Any] = {}
        if present:
            reduce_aux_losses_tracker_across_ranks(present)
            for name in present:
                values = tracker[name]["values"].double().to(passes.device)
                per_layer = torch.where(passes > 0, values / passes.clamp(min=1), torch.zeros_like(values))
                seen = passes[: per_layer.shape[0]] > 0
                out[names[name]] = float(per_layer[seen].mean()) if bool(seen.any()) else None
                out[f"{names[name]}_per_layer"] = [round(float(v), 6) for v in per_layer]
            clear_aux_losses_tracker()
        return out

    def close(self) -> None:
        """Remove the hooks and the gating wrappers."""
        for handle in self._handles:
            handle.remove()
        for router in self.routers:
            router.__dict__.pop("gating", None)
        self._handles, self._logits = [], {}


def _load_figures(load: torch.Tensor, num_experts: int) -> Dict[str, Any]:
    """Per-layer balance figures from tokens per expert [layers, experts]."""
    per_layer = load.sum(dim=1)
    mean = per_layer / num_experts
    seen = per_layer > 0
    max_over_mean = torch.where(seen, load.max(dim=1).values / mean.clamp(min=1e-12), torch.zeros_like(mean))
    share = load / per_layer.clamp(min=1e-12).unsqueeze(1)
    entropy = -(share * torch.log(share.clamp(min=1e-300))).sum(dim=1) / math.log(num_experts)
    return {
        "moe_load_max_over_mean": [round(float(v), 4) for v in max_over_mean],
        "moe_load_max_over_mean_worst": float(max_over_mean.max()) if bool(seen.any()) else None,
        "moe_load_entropy": [round(float(v), 4) for v in torch.where(seen, entropy, torch.zeros_like(entropy))],
        "moe_dead_experts": int(((load == 0) & seen.unsqueeze(1)).sum()),
    }


def moe_routing(model_chunks: List[torch.nn.Module], parallel: ParallelConfig) -> Optional[MoeRouting]:
    """A `MoeRouting` over this rank's stage, or None for a dense language model."""
    if not _routers(model_chunks):
        return None
    return MoeRouting(model_chunks, sequence_parallel=parallel.sequence_parallel)
