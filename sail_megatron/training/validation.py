"""Validation during training: the same fixed rows every time, forward only, under the training
layout; the loss per trained token over every data-parallel rank, so it equals a single-process
evaluation of the same rows whatever the TP/PP/DP layout."""

import logging
import time
from dataclasses import dataclass, replace
from typing import List

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from sail_megatron.config import ConfigError
from sail_megatron.data.dataset_path import VALID_SPLIT_FIX
from sail_megatron.training.collectives import gather_ints_over_data_parallel
from sail_megatron.training.metered_data import build_materializer
from sail_megatron.training.step import forward_step, reduce_loss_reports

logger = logging.getLogger(__name__)


@dataclass
class ValidResult:
    loss: float
    """Mean loss per trained token over every rank's validation rows."""
    trained_tokens: int
    seconds: float


def _no_validation_data(source: str, why: str) -> ConfigError:
    return ConfigError(
        "data.valid_path",
        f"the validation split of {source} {why}",
        VALID_SPLIT_FIX,
    )


def _same_count_on_every_rank(rows: List, source: str) -> List:
    """Every data-parallel rank runs as many micro-batches (collectives inside the forward, FP8 amax
    reductions, must line up): ranks with fewer rows repeat their last one with nothing trained."""
    counts = [c for (c,) in gather_ints_over_data_parallel([len(rows)])]
    if max(counts) == 0:
        raise _no_validation_data(source, "holds no samples")
    if not rows:
        raise _no_validation_data(
            source,
            f"has too few samples for {len(counts)} data-parallel ranks (rows per rank: {counts})",
        )
    blank = replace(rows[-1], loss_mask=torch.zeros_like(rows[-1].loss_mask), keys=[], spans=[])
    return rows + [blank] * (max(counts) - len(rows))


class Validator:
    """This rank's validation rows (read once, undecoded) and how to score the model on them."""

    def __init__(self, cfg, tokenizer, device, num_micro: int):
        from megatron.energon.flavors.webdataset.empty_dataset_error import EmptyDatasetError

        from sail_megatron.data.loader import build_valid_loader

        source = cfg.data.valid_path or cfg.data.path
        limit = cfg.run.eval_steps * num_micro or None
        began = time.perf_counter()
        try:
            loader = build_valid_loader(
                cfg.data,
                tokenizer,
                cfg.model.vision.image_size,
                cfg.model.tokens_per_tile,
                parallel_state.get_data_parallel_rank(),
                parallel_state.get_data_parallel_world_size(),
                seed=cfg.run.seed,
                limit=limit,
            )
            rows = list(loader)
        except EmptyDatasetError as e:
            raise _no_validation_data(source, f"is empty ({e})") from None
        self.rows = _same_count_on_every_rank(rows, source)
        self.materialize = build_materializer(cfg, tokenizer, device)
        self.seq_length, self.micro_batch_size = cfg.data.seq_length, cfg.data.micro_batch_size
        logger.info(
            "validation: %d rows per data-parallel rank from the val split of %s (read in %.1f s)",
            len(self.rows),
            source,
            time.perf_counter() - began,
        )

    def run(self, chunks: List[torch.nn.Module]) -> ValidResult:
        """Collective: every rank calls it at the same step."""
        began = time.perf_counter()
        # With overlap_param_gather the forward pre-hooks gather the weights a step updated: finish that
        # gather now and run the validation forwards without the hooks (megatron's own evaluation does so).
        hooked = [c for c in chunks if getattr(c, "use_forward_hook", False)]
        for chunk in hooked:
            chunk.disable_forward_pre_hook(param_sync=True)
        for chunk in chunks:
            chunk.eval()
        try:
            with torch.no_grad():
                reports = get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=(self.materialize(row) for row in self.rows),
                    model=chunks,
                    num_microbatches=len(self.rows),
                    seq_length=self.seq_length,
                    micro_batch_size=self.micro_batch_size,
                    forward_only=True,
                )
        finally:
            for chunk in chunks:
                chunk.train()
            for chunk in hooked:
                chunk.enable_forward_pre_hook()
        loss_sum, tokens = reduce_loss_reports(reports).tolist()
        return ValidResult(loss_sum / max(tokens, 1.0), int(tokens), time.perf_counter() - began)
