"""The layouts `sail-bench plan` considers: every tensor/pipeline/data-parallel split (and expert-parallel
split of a mixture-of-experts model), where the vision encoder runs, micro-batch size, recomputation and
optimizer layout the recipe's own checks accept."""

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from sail_megatron.config import ConfigError
from sail_megatron.config.train import TrainConfig

TENSOR_PARALLEL = (1, 2, 4, 8)
MICRO_BATCH_SIZES = (1, 2, 4)
EXPERT_PARALLEL = (1, 2, 4, 8, 16, 32, 64)
VISION_LAYOUTS = ("tensor", "data")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    num_microbatches: int
    recompute_granularity: Optional[str]
    recompute_method: str
    recompute_num_layers: int
    recompute_vision: bool
    distributed_optimizer: bool
    sequence_parallel: bool
    ep: int = 1
    """Expert-parallel ranks (mixture-of-experts models; 1 otherwise)."""
    etp: int = 1
    """Ranks one expert is split over (resolved: the recipe's, else TP)."""
    vision_parallel: str = "tensor"
    """parallel.vision_parallel: the ViT split over the TP ranks ('tensor') or whole on each ('data')."""

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp

    @property
    def vision_tp(self) -> int:
        return self.tp if self.vision_parallel == "tensor" else 1

    @property
    def expert_dp(self) -> int:
        """Ranks that hold the same experts."""
        return self.tp * self.dp // (self.etp * self.ep)


def _recompute_options(cfg: TrainConfig) -> List[Tuple[Optional[str], str, int]]:
    """The recipe's own language-model recomputation, and full recomputation (or none, when the recipe
    already recomputes fully)."""
    p = cfg.parallel
    own = (p.recompute_granularity, p.recompute_method, p.recompute_num_layers)
    other = (None, "uniform", 1) if p.recompute_granularity == "full" else ("full", "uniform", 1)
    return [own, other]


def candidate_layouts(cfg: TrainConfig, gpus: int) -> Tuple[List[Layout], List[str]]:
    """Every layout the recipe's checks accept on `gpus` GPUs, and why the others were left out (one line
    per reason, naming the layouts it refused)."""
    lang = cfg.model.language
    pipeline = [2**k for k in range(int(math.log2(lang.num_layers)) + 1)]
    vision_options = [False, True] if "vision" in cfg.freeze.trainable else [False]
    experts = [e for e in EXPERT_PARALLEL if e <= lang.num_experts] if lang.is_moe else [1]
    out: List[Layout] = []
    refused: Dict[str, List[str]] = {}
    for tp, pp, ep in itertools.product(TENSOR_PARALLEL, pipeline, experts):
        for vit in VISION_LAYOUTS if tp > 1 else (cfg.parallel.vision_parallel,):
            for mbs in MICRO_BATCH_SIZES:
                for granularity, method, num_layers in _recompute_options(cfg):
                    for vision in vision_options:
                        for distopt in (True, False):
                            parallel = dataclasses.replace(
                                cfg.parallel,
                                tensor_model_parallel_size=tp,
                                pipeline_model_parallel_size=pp,
                                expert_model_parallel_size=ep,
                                vision_parallel=vit,
                                sequence_parallel=cfg.parallel.sequence_parallel and tp > 1,
                                recompute_granularity=granularity,
                                recompute_method=method,
                                recompute_num_layers=num_layers,
                                recompute_vision=vision,
                                use_distributed_optimizer=distopt,
                            )
                            trial = copy.copy(cfg)
                            trial.parallel = parallel
                            trial.data = dataclasses.replace(
                                cfg.data, micro_batch_size=mbs, tokenizer=cfg.data.tokenizer or "unused"
                            )
                            try:
                                parallel.validate(cfg.model, gpus)
                                trial.data.validate(needs_path=False)
                                micro = trial.num_microbatches(gpus)
                            except ConfigError as e:
                                where = f"TP={tp} PP={pp}{f' EP={ep}' if lang.is_moe else ''} micro-batch {mbs}"
                                if where not in refused.setdefault(str(e), []):
                                    refused[str(e)].append(where)
                                continue
                            out.append(
                                Layout(
                                    tp=tp,
                                    pp=pp,
                                    dp=parallel.data_parallel_size(gpus),
                                    micro_batch_size=mbs,
                                    num_microbatches=micro,
                                    recompute_granularity=granularity,
                                    recompute_method=method,
                                    recompute_num_layers=num_layers,
                                    recompute_vision=vision,
                                    distributed_optimizer=distopt,
                                    sequence_parallel=parallel.sequence_parallel,
                                    ep=ep,
                                    etp=parallel.expert_tensor_size,
                                    vision_parallel=vit,
                                )
                            )
    return out, [f"{reason} ({', '.join(where)})" for reason, where in refused.items()]


def recipe_layout(cfg: TrainConfig, gpus: int) -> Layout:
    """The layout the recipe itself sets, on `gpus` GPUs."""
    p = cfg.parallel
    return Layout(
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        dp=p.data_parallel_size(gpus),
        micro_batch_size=cfg.data.micro_batch_size,
        num_microbatches=cfg.num_microbatches(gpus),
        recompute_granularity=p.recompute_granularity,
        recompute_method=p.recompute_method,
        recompute_num_layers=p.recompute_num_layers,
        recompute_vision=p.recompute_vision,
        distributed_optimizer=p.use_distributed_optimizer,
        sequence_parallel=p.sequence_parallel,
        ep=p.expert_model_parallel_size,
        etp=p.expert_tensor_size,
        vision_parallel=p.vision_parallel,
    )
