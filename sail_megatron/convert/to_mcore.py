"""`sail-convert hf-to-mcore`: an InternVL-chat (SAIL-VL) Hugging Face folder -> a megatron checkpoint.

Streaming: the model is built once at the target dtype without random init, and filled one HF tensor
at a time (pread, no mapping), so peak memory is the model plus the largest single tensor. Everything
that can be wrong with the input is checked from config.json and the safetensors headers before any
output exists; the output folder appears only when complete.

The output folder: `latest` + `iter_0000000/` (a dist_checkpointing checkpoint, loadable by `run.init_from`
under any TP/PP), and `hf_source/` with the source's tokenizer and other small files plus the ViT layers
after `select_layer` (not part of our model; carried so the export is the same checkpoint again).
"""

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set

import torch

from sail_megatron.config import ModelConfig
from sail_megatron.convert import mapping
from sail_megatron.convert.checks import check_layout, check_tensors, resolve_dtype
from sail_megatron.convert.errors import ConversionError
from sail_megatron.convert.hf_config import model_config_from_hf, read_json
from sail_megatron.convert.hf_io import SafetensorsFolder, ShardedSafetensorsWriter
from sail_megatron.convert.mcore_io import (
    FORMAT_VERSION,
    HF_SOURCE_DIR,
    UNUSED_TENSORS_FILE,
    build_empty_model,
    save_model,
    single_process,
    target_vocab_rows,
)
from sail_megatron.convert.outputs import atomic_output_dir, check_output_free, copy_files, side_files
from sail_megatron.convert.tokens import find_token_id

logger = logging.getLogger(__name__)


def fill_params(
    model: torch.nn.Module, folder: SafetensorsFolder, rules: Iterable[mapping.TensorRule], cfg: ModelConfig
) -> Set[str]:
    """Copy each rule's HF tensors, re-laid-out, into the model's parameter (cast to its dtype).
    Returns the parameter names filled."""
    params = dict(model.named_parameters())
    filled: Set[str] = set()
    vocab = cfg.language.vocab_size
    with torch.no_grad():
        for rule in rules:
            tensors = [folder.read(n) for n in rule.hf]
            param = params[rule.mcore]
            if rule.kind == mapping.TIED_HEAD:
                if not torch.equal(tensors[0].to(param.dtype), param[:vocab]):
                    raise ConversionError(
                        "inconsistent tied embeddings",
                        [f"tie_word_embeddings is true but {rule.hf[0]} differs from the token embedding"],
                        "set llm_config.tie_word_embeddings=false if the output layer is separate",
                    )
                continue
            if rule.kind == mapping.VOCAB:  # in place: no padded temporary of the largest tensor
                param[: tensors[0].shape[0]].copy_(tensors[0])
                param[tensors[0].shape[0] :].zero_()
            else:
                value = mapping.to_mcore(rule, tensors, cfg, param.shape[0])
                if value.shape != param.shape:
                    raise RuntimeError(f"{rule.mcore}: mapped shape {tuple(value.shape)} != {tuple(param.shape)}")
                param.copy_(value)
            filled.add(rule.mcore)
            del tensors
    return filled


def check_all_filled(model: torch.nn.Module, filled: Set[str]) -> None:
    """Every parameter came from somewhere (a mapping bug otherwise, never silently random weights)."""
    left = sorted(set(dict(model.named_parameters())) - filled)
    if left:
        raise RuntimeError(f"{len(left)} parameters have no source in the mapping: {left}")


def carry_unused(
    folder: SafetensorsFolder, names: List[str], dest: Path, rename: Callable[[str], str] = lambda n: n
) -> List[str]:
    """Copy the tensors our model does not use (ViT layers after select_layer) into `dest`, bit for bit,
    under their InternVL-chat names. Returns those names."""
    if not names:
        return []
    dest.mkdir(parents=True, exist_ok=True)
    plan = [(rename(n), folder.tensors[n].dtype, folder.tensors[n].shape) for n in names]
    writer = ShardedSafetensorsWriter(dest, plan, file_name=UNUSED_TENSORS_FILE)
    try:
        for n in names:
            writer.write(rename(n), folder.read(n))
    except BaseException:
        writer.abandon()
        raise
    writer.close()
    return [p[0] for p in plan]


def provenance(
    cfg: ModelConfig,
    hf_config: Dict,
    dtype: str,
    tp: int,
    pp: int,
    vocab_rows: int,
    lm_head_stored: bool,
    unused: List[str],
    files: List[str],
    source: str,
    tool: str,
    ep: int = 1,
) -> Dict:
    """What a later export or verify needs to rebuild the model and the HF folder without guessing."""
    return {
        "format_version": FORMAT_VERSION,
        "tool": tool,
        "source": source,
        "model": dataclasses.asdict(cfg),
        "hf_config": hf_config,
        "dtype": dtype,
        "target_tp": tp,
        "target_pp": pp,
        "target_ep": ep,
        "vocab_rows": vocab_rows,
        "lm_head_stored": lm_head_stored,
        "unused_tensors": unused,
        "side_files": files,
    }


def hf_to_mcore(
    hf_dir,
    out_dir,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "auto",
    make_vocab_size_divisible_by: int = 128,
    image_token_id: Optional[int] = None,
    ep: int = 1,
) -> Path:
    """Convert an InternVL-chat / SAIL-VL Hugging Face folder into a megatron checkpoint folder.

    `tp`/`pp`/`ep` name the layout it will train under: the model must split that way (`ep`: its experts over
    expert-parallel ranks), and the vocabulary is padded for that TP (megatron loads it under other layouts
    too). `dtype` 'auto' keeps the stored
    dtype (bitwise). Raises ConversionError, listing every problem, before writing anything.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output_free(out_dir)
    hf_config = read_json(hf_dir / "config.json")
    cfg = model_config_from_hf(hf_config, make_vocab_size_divisible_by, source=str(hf_dir / "config.json"))
    folder = SafetensorsFolder(hf_dir)
    head = f"{mapping.LLM_PREFIX}lm_head.weight"
    lm_head_stored = cfg.language.tie_word_embeddings and head in folder.tensors
    dtypes = {n: i.dtype for n, i in folder.tensors.items()}
    check_tensors(folder.shapes, mapping.expected_hf_shapes(cfg, lm_head_stored), dtypes, str(hf_dir))
    check_layout(cfg, tp, pp, ep)
    dtype = resolve_dtype(dtype, list(dtypes.values()), source=str(hf_dir))
    cfg.image_context_token_id = image_token_id if image_token_id is not None else find_token_id(hf_dir)
    if cfg.image_context_token_id is None:
        logger.warning(
            "%s has no tokenizer with an <IMG_CONTEXT> token: the checkpoint records no image-token id "
            "(training takes it from data.tokenizer); pass --image-token-id to record one",
            hf_dir,
        )
    rows = target_vocab_rows(cfg, tp)
    logger.info("hf-to-mcore %s -> %s: %s, TP %d x PP %d, %d vocabulary rows", hf_dir, out_dir, dtype, tp, pp, rows)
    with folder, atomic_output_dir(out_dir) as tmp:
        unused = carry_unused(folder, mapping.unused_hf_names(cfg), tmp / HF_SOURCE_DIR)
        files = copy_files(side_files(hf_dir), tmp / HF_SOURCE_DIR)
        record = provenance(
            cfg, hf_config, dtype, tp, pp, rows, lm_head_stored, unused, files, str(hf_dir.resolve()), "hf-to-mcore", ep
        )
        with single_process():
            model = build_empty_model(cfg, dtype, rows)
            check_all_filled(model, fill_params(model, folder, mapping.tensor_rules(cfg, lm_head_stored), cfg))
            save_model(model, tmp, record)
            del model
    return out_dir
