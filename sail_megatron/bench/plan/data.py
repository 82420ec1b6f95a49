"""What `sail-bench plan` takes the stage's data to look like (tokens and tiles per sample, packed rows):
the means `sail-data prepare --recipe` measured for data.path when it is here (bench/plan_measured_data.py),
else a synthetic assumption; and the stage's budget in tokens."""

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from sail_megatron.bench.plan.errors import PlanError
from sail_megatron.bench.plan.measured_data import coverage, rescaled
from sail_megatron.bench.synthetic_rows import caption_like, sft_like
from sail_megatron.config.counts import format_count
from sail_megatron.config.train import TrainConfig
from sail_megatron.data.packing import plan_packs
from sail_megatron.data.statistics import TokenStatistics

SAMPLES = 4096
"""Synthetic samples the data assumptions are drawn from (seed 0)."""


@dataclass
class DataAssumption:
    kind: str
    """'caption-like' or 'SFT-like' (the synthetic distributions of bench/synthetic_rows.py): the data, or,
    when measured, the shape of the distribution rescaled to the measured means."""
    why: str
    source: str
    """'measured by sail-data prepare --recipe on ...', or 'assumed' and why no measurement was used."""
    mean_tokens_per_sample: float
    mean_tiles_per_sample: float
    image_token_fraction: float
    """<IMG_CONTEXT> tokens over all tokens."""
    packed: bool
    utilization: float
    """Real tokens over token slots of the rows."""
    mean_tokens_per_row: float
    mean_tiles_per_row: float
    worst_tiles_per_row: int
    """What the memory estimate assumes for one row: data.max_tiles_per_pack when packing (the packer's
    bound), else the largest sample of the distribution."""
    rows: List[Tuple[List[int], int]] = field(repr=False, default_factory=list)
    """(sample lengths, tiles) of each row, for the FLOP count."""
    measured: Optional[Dict[str, Any]] = None
    """data/statistics.py's TokenStatistics, when measured."""

    def describe(self) -> str:
        rows = (
            f"packed rows: {100 * self.utilization:.1f}% of token slots filled, {self.mean_tiles_per_row:.1f} tiles "
            f"per row on average, {self.worst_tiles_per_row} at most (data.max_tiles_per_pack)"
            if self.packed
            else f"one sample per row: {100 * self.utilization:.1f}% of token slots filled"
        )
        means = (
            f"{self.mean_tokens_per_sample:.0f} tokens and {self.mean_tiles_per_sample:.2f} tiles per sample, "
            f"{100 * self.image_token_fraction:.0f}% image tokens"
        )
        if self.measured:
            m = self.measured
            return (
                f"{means}, over {m['samples_measured']:,} samples (measured with {m['source']}); FLOPs and rows "
                f"from the {self.kind} distribution ({self.why}) rescaled to these means; {rows}"
            )
        return f"{self.kind} samples ({self.why}): {means}; {rows}"


def stage_kind(cfg: TrainConfig) -> Tuple[str, str]:
    """Which synthetic distribution stands for the stage's data, and why."""
    if "language" in cfg.freeze.trainable:
        return "SFT-like", "the language model trains: an SFT stage"
    return "caption-like", "the language model is frozen: a pretraining stage"


def data_assumption(
    cfg: TrainConfig, measured: Optional[TokenStatistics] = None, why_assumed: str = ""
) -> DataAssumption:
    """The stage's data as the synthetic distribution of its kind (rescaled to the `measured` means when
    given), packed as the loader would pack it (buffers of data.packing_buffer_size samples planned with
    plan_packs). why_assumed: why no measured means were used (one line, for the output)."""
    kind, why = stage_kind(cfg)
    make = sft_like if kind == "SFT-like" else caption_like
    tokens, tiles = make(SAMPLES, seed=0, tokens_per_tile=cfg.model.tokens_per_tile)
    if measured is not None:
        tokens, tiles = rescaled(tokens, tiles, measured, cfg)
    d = cfg.data
    keep = (tokens <= d.seq_length) & (tiles <= d.max_tiles_per_pack)  # the encoder cuts or skips the rest
    tokens, tiles = tokens[keep], tiles[keep]
    if not len(tokens):
        raise PlanError("data.seq_length", f"{d.seq_length} tokens hold none of the assumed {kind} samples")
    rows: List[Tuple[List[int], int]] = []
    if d.packing:
        for start in range(0, len(tokens), d.packing_buffer_size):
            tok, til = tokens[start : start + d.packing_buffer_size], tiles[start : start + d.packing_buffer_size]
            plan = plan_packs(tok, til, d.seq_length, d.max_tiles_per_pack)
            rows += [([int(tok[i]) for i in pack], int(til[pack].sum())) for pack in plan.packs]
        worst = d.max_tiles_per_pack
    else:
        rows = [([int(n)], int(t)) for n, t in zip(tokens, tiles)]
        worst = int(tiles.max())
    row_tokens = np.array([sum(lengths) for lengths, _ in rows])
    if measured is not None:
        per_sample = measured.mean_tokens_per_sample
        per_sample_tiles = measured.mean_tiles_per_sample
        image_fraction = measured.mean_image_tokens_per_sample / measured.mean_tokens_per_sample
        source = coverage(measured)
    else:
        per_sample, per_sample_tiles = float(tokens.mean()), float(tiles.mean())
        image_fraction = float((tiles * cfg.model.tokens_per_tile).sum() / tokens.sum())
        source = "assumed" + (f": {why_assumed}" if why_assumed else "")
    return DataAssumption(
        kind=kind,
        why=why,
        source=source,
        mean_tokens_per_sample=per_sample,
        mean_tiles_per_sample=per_sample_tiles,
        image_token_fraction=image_fraction,
        packed=d.packing,
        utilization=float(row_tokens.mean() / d.seq_length),
        mean_tokens_per_row=float(row_tokens.mean()),
        mean_tiles_per_row=float(np.mean([t for _, t in rows])),
        worst_tiles_per_row=worst,
        rows=rows,
        measured=asdict(measured) | {"unmeasured": list(measured.unmeasured)} if measured is not None else None,
    )


# --- the budget ----------------------------------------------------------------------------------------------


@dataclass
class BudgetTokens:
    tokens: float
    description: str


def budget_tokens(cfg: TrainConfig, data: DataAssumption, tokens_per_sample: Optional[float]) -> BudgetTokens:
    budget = cfg.run.budget()  # a ConfigError unless exactly one of train_steps/tokens/samples is set
    unit, amount = budget.unit, budget.amount
    if unit == "tokens":
        return BudgetTokens(amount, f"{format_count(amount)} tokens (run.train_tokens)")
    if unit == "samples":
        if tokens_per_sample is not None:
            per, source = tokens_per_sample, "--tokens-per-sample"
        elif data.measured:
            per, source = data.mean_tokens_per_sample, "the measured mean of data.path"
        else:
            per, source = data.mean_tokens_per_sample, f"the {data.kind} mean"
        return BudgetTokens(
            amount * per, f"{format_count(amount)} samples (run.train_samples) x {per:.0f} tokens per sample ({source})"
        )
    per_step = cfg.run.global_batch_size * data.mean_tokens_per_row
    return BudgetTokens(
        amount * per_step,
        f"{amount} steps (run.train_steps) x {cfg.run.global_batch_size} rows x {data.mean_tokens_per_row:.0f} "
        f"tokens per row ({cfg.data.seq_length} slots, {100 * data.utilization:.1f}% filled with the "
        + ("measured samples" if data.measured else f"assumed {data.kind} samples")
        + ")",
    )
