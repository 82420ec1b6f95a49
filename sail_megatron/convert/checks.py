"""Checks run before any output exists: tensors against the config, the target layout, dtypes."""

import logging
from typing import Dict, List, Sequence, Tuple

import torch

from sail_megatron.config import ConfigError, ModelConfig, ParallelConfig
from sail_megatron.convert.errors import raise_if

logger = logging.getLogger(__name__)

DTYPE_OPTIONS = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DTYPE_OF = {v: k for k, v in DTYPE_OPTIONS.items()}


def tensor_problems(
    actual: Dict[str, Tuple[int, ...]],
    expected: Dict[str, Tuple[int, ...]],
    dtypes: Dict[str, torch.dtype],
    where: str = "",
) -> List[str]:
    """Every missing, unexpected, mis-shaped or non-float tensor, one line each."""
    at = f" in {where}" if where else ""
    problems = [f"missing tensor{at}: {n} (expected shape {list(expected[n])})" for n in expected if n not in actual]
    problems += [f"unexpected tensor{at}: {n} (shape {list(actual[n])})" for n in sorted(actual) if n not in expected]
    problems += [
        f"wrong shape{at}: {n} is {list(actual[n])}, the config implies {list(expected[n])}"
        for n in expected
        if n in actual and tuple(actual[n]) != tuple(expected[n])
    ]
    problems += [
        f"unsupported dtype{at}: {n} is {dtypes[n]}" for n in expected if n in dtypes and dtypes[n] not in DTYPE_OF
    ]
    return problems


def check_tensors(
    actual: Dict[str, Tuple[int, ...]],
    expected: Dict[str, Tuple[int, ...]],
    dtypes: Dict[str, torch.dtype],
    source: str,
) -> None:
    """Raise a ConversionError naming every tensor that does not fit the config."""
    raise_if(
        tensor_problems(actual, expected, dtypes),
        f"the tensors in {source} do not match its config",
        "check that config.json and the safetensors files belong to the same model",
    )


def layout_problems(cfg: ModelConfig, tp: int, pp: int, ep: int = 1) -> List[str]:
    """Every way the model does not split over TP x PP (x EP: its experts over expert-parallel ranks)."""
    problems = []
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"--{name} must be a positive integer, got {value!r}")
    if problems:
        return problems
    lang, vision = cfg.language, cfg.vision
    ffn = ("language moe_intermediate_size", lang.moe_ffn_hidden_size) if lang.is_moe else None
    for name, value in (
        ("language num_attention_heads", lang.num_attention_heads),
        ("language num_key_value_heads (query groups)", lang.num_query_groups),
        ffn or ("language intermediate_size", lang.ffn_hidden_size),
        ("language hidden_size (projector output)", lang.hidden_size),
        ("vision num_attention_heads", vision.num_attention_heads),
        ("vision intermediate_size", vision.ffn_hidden_size),
    ):
        if value % tp:
            problems.append(f"TP {tp} does not divide the {name} ({value})")
    if lang.num_layers % pp:
        problems.append(f"PP {pp} does not divide the {lang.num_layers} language layers")
    if ep > 1 and not lang.is_moe:
        problems.append(f"EP {ep} needs a mixture-of-experts language model ({lang.arch} has no experts)")
    elif lang.is_moe and lang.num_experts % ep:
        problems.append(f"EP {ep} does not divide the {lang.num_experts} experts")
    if not problems:
        try:  # whatever else the trainer would refuse for this layout (MoE under TP trains with SP)
            ParallelConfig(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                expert_model_parallel_size=ep,
                sequence_parallel=tp > 1 and lang.is_moe,
            ).validate(cfg, tp * pp * ep)
        except ConfigError as e:
            problems.append(str(e))
    return problems


def check_layout(cfg: ModelConfig, tp: int, pp: int, ep: int = 1) -> None:
    layout = f"TP {tp} x PP {pp}" + (f" x EP {ep}" if ep != 1 else "")
    raise_if(
        layout_problems(cfg, tp, pp, ep),
        f"the model cannot be laid out as {layout}",
        "choose --tp dividing the head, query-group and FFN sizes, --pp dividing the layer count and --ep "
        "dividing the experts",
    )


def _float_counts(dtypes: Sequence[torch.dtype]) -> Dict[torch.dtype, int]:
    counts: Dict[torch.dtype, int] = {}
    for d in dtypes:
        if d in DTYPE_OF:
            counts[d] = counts.get(d, 0) + 1
    return counts


def stored_dtype(dtypes: Sequence[torch.dtype]) -> str:
    """The floating dtype holding most tensors (fp32 when there is none)."""
    counts = _float_counts(dtypes)
    return DTYPE_OF[max(counts, key=counts.get)] if counts else "fp32"


def resolve_dtype(requested: str, dtypes: Sequence[torch.dtype], source: str = "the checkpoint") -> str:
    """'auto' -> the stored floating dtype holding most tensors; otherwise the requested one."""
    if requested != "auto":
        raise_if(
            [] if requested in DTYPE_OPTIONS else [f"unknown dtype {requested!r}"],
            "bad --dtype",
            f"use one of auto, {', '.join(DTYPE_OPTIONS)}",
        )
        return requested
    chosen, counts = stored_dtype(dtypes), _float_counts(dtypes)
    if len(counts) > 1:  # a silent pick would hide that some tensors change dtype
        mix = ", ".join(f"{DTYPE_OF[d]} ({n} tensors)" for d, n in sorted(counts.items(), key=lambda c: -c[1]))
        logger.warning(
            "dtype auto: %s mixes %s; using %s for every tensor (pass --dtype to choose)", source, mix, chosen
        )
    return chosen
