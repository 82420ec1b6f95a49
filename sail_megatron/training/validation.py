"""Validation during training: the same fixed rows every time, forward only, under the training
layout; the loss per trained token over every data-parallel rank, for each source (data/valid_sources.py)
and over all of them, so each equals a single-process evaluation of the same rows whatever the TP/PP/DP
layout. Each source is read into rows of its own (no packed row mixes sources), at most run.eval_steps
batches of global_batch_size rows per source."""

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from sail_megatron.config import ConfigError
from sail_megatron.data.dataset_path import VALID_SPLIT_FIX
from sail_megatron.data.valid_sources import ValidSource, datasets_left_unvalidated, valid_sources
from sail_megatron.platform import read_dist_env
from sail_megatron.training.collectives import gather_ints_over_data_parallel
from sail_megatron.training.metered_data import build_materializer
from sail_megatron.training.step import forward_step

logger = logging.getLogger(__name__)


@dataclass
class SourceLoss:
    loss: Optional[float]
    """Mean loss per trained token over every rank's rows of this source (None: nothing trained in them)."""
    trained_tokens: int


@dataclass
class ValidResult:
    loss: float
    """Mean loss per trained token over every rank's validation rows, all sources together."""
    trained_tokens: int
    seconds: float
    sources: Dict[str, SourceLoss] = field(default_factory=dict)
    """Each source's own loss, in the order of data/valid_sources.py."""


def _no_validation_data(source, why: str) -> ConfigError:
    return ConfigError(source.field, f"{source.describe()} {why}", VALID_SPLIT_FIX)


def _same_count_on_every_rank(rows: List[List], sources: List[ValidSource]) -> List[Tuple[int, object]]:
    """This rank's rows as (source index, row), sources one after another. Every data-parallel rank runs
    as many micro-batches (collectives inside the forward, FP8 amax reductions, must line up): ranks with
    fewer rows repeat their last one with nothing trained."""
    counts = gather_ints_over_data_parallel([len(r) for r in rows])
    for i, source in enumerate(sources):
        if not sum(c[i] for c in counts):
            raise _no_validation_data(source, "holds no samples")
    tagged = [(i, row) for i, own in enumerate(rows) for row in own]
    totals = [sum(c) for c in counts]
    if not tagged:
        raise ConfigError(
            sources[0].field,
            f"the validation sources ({', '.join(s.name for s in sources)}) have too few samples for "
            f"{len(counts)} data-parallel ranks (rows per rank: {totals})",
            VALID_SPLIT_FIX,
        )
    last_source, last = tagged[-1]
    blank = replace(last, loss_mask=torch.zeros_like(last.loss_mask), keys=[], spans=[])
    return tagged + [(last_source, blank)] * (max(totals) - len(tagged))


def _forward_step_of_source(data_iterator: Iterator[Tuple[int, object]], model: torch.nn.Module):
    """forward_step on a (source index, batch) pair: the loss report carries the source."""
    source, batch = next(data_iterator)
    output, loss_func = forward_step(iter((batch,)), model)

    def loss_of_source(output_tensor):
        loss, tokens, report = loss_func(output_tensor)
        return loss, tokens, {**report, "source": source}

    return output, loss_of_source


def reduce_source_reports(reports: List[dict], num_sources: int) -> torch.Tensor:
    """[source, (loss sum, token count)] over micro-batches and data-parallel ranks, on every rank:
    `reduce_loss_reports` kept apart by source."""
    total = torch.zeros(num_sources, 2, dtype=torch.float64, device=read_dist_env().device)
    for report in reports:
        total[report["source"]] += report["lm loss"].to(total)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    # Only the last pipeline stage computed losses; share them along the pipeline.
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total


class Validator:
    """This rank's validation rows, per source (read once, undecoded), and how to score the model on them."""

    def __init__(self, cfg, tokenizer, device, num_micro: int):
        from megatron.energon.flavors.webdataset.empty_dataset_error import EmptyDatasetError

        from sail_megatron.data.loader import build_valid_loader

        self.sources = valid_sources(cfg.data)
        # Per source: run.eval_steps batches of global_batch_size rows (this rank's num_micro of each).
        limit = cfg.run.eval_steps * num_micro or None
        began = time.perf_counter()
        rows = []
        for source in self.sources:
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
                    path=source.path,
                )
                rows.append(list(loader))
            except EmptyDatasetError as e:
                raise _no_validation_data(source, f"is empty ({e})") from None
        self.rows = _same_count_on_every_rank(rows, self.sources)
        self.materialize = build_materializer(cfg, tokenizer, device)
        self.seq_length, self.micro_batch_size = cfg.data.seq_length, cfg.data.micro_batch_size
        logger.info(
            "validation: %d rows per data-parallel rank from the val split of %d source(s): %s (read in %.1f s)",
            len(self.rows),
            len(self.sources),
            ", ".join(f"{s.name} ({s.path}: {len(r)} rows here)" for s, r in zip(self.sources, rows)),
            time.perf_counter() - began,
        )
        left_out = datasets_left_unvalidated(cfg.data, self.sources)
        if left_out:
            logger.warning(
                "validation: %s trains on datasets its val split does not hold, which get no validation loss: %s",
                cfg.data.path,
                ", ".join(left_out),
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
                    forward_step_func=_forward_step_of_source,
                    data_iterator=((source, self.materialize(row)) for source, row in self.rows),
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
        sums = reduce_source_reports(reports, len(self.sources))
        loss_sum, tokens = sums.sum(dim=0).tolist()
        per_source = {
            source.name: SourceLoss(s_loss / s_tokens if s_tokens else None, int(s_tokens))
            for source, (s_loss, s_tokens) in zip(self.sources, sums.tolist())
        }
        return ValidResult(loss_sum / max(tokens, 1.0), int(tokens), time.perf_counter() - began, per_source)
