"""`sail-convert init`: a fresh stage-1 SAIL-VL checkpoint from a Qwen2 folder and an InternViT folder.

The language model and the vision encoder come from their standalone Hugging Face releases (Qwen2's
`model.*`/`lm_head.*` names, InternViT's `embeddings.*`/`encoder.layers.N.*`); the projector (`mlp1`) is
new, initialized as megatron-core initializes it in training (normal(0, 0.02) for fc1, the scaled
output init for fc2, zero biases, LayerNorm 1/0). The output is laid out like `hf-to-mcore`'s, with an
InternVL-chat config.json recorded for the later export.
"""

import logging
from pathlib import Path
from typing import List, Optional, Set

import torch

from sail_megatron.config import ConfigError, ModelConfig, ProjectorConfig
from sail_megatron.convert import mapping
from sail_megatron.convert.checks import check_layout, resolve_dtype, tensor_problems
from sail_megatron.convert.errors import raise_if
from sail_megatron.convert.hf_config import (
    hf_config_from_model,
    language_from_hf,
    read_json,
    stage1_template,
    vision_from_hf,
)
from sail_megatron.convert.hf_io import SafetensorsFolder
from sail_megatron.convert.mcore_io import (
    HF_SOURCE_DIR,
    build_empty_model,
    save_model,
    single_process,
    target_vocab_rows,
)
from sail_megatron.convert.outputs import atomic_output_dir, check_output_free, copy_files, tokenizer_files
from sail_megatron.convert.to_mcore import carry_unused, check_all_filled, fill_params, provenance
from sail_megatron.convert.tokens import find_token_id

logger = logging.getLogger(__name__)


def init_projector(model: torch.nn.Module, seed: int) -> Set[str]:
    """Initialize the projector in place like megatron-core would; returns its parameter names."""
    proj = model.projector
    cfg = proj.mlp.encoder.linear_fc1.config
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            proj.layer_norm.weight.fill_(1.0)
            proj.layer_norm.bias.zero_()
            cfg.init_method(proj.mlp.encoder.linear_fc1.weight)
            cfg.output_layer_init_method(proj.mlp.encoder.linear_fc2.weight)
            proj.mlp.encoder.linear_fc1.bias.zero_()
            proj.mlp.encoder.linear_fc2.bias.zero_()
    finally:
        torch.set_rng_state(generator_state)
    return {f"projector.{n}" for n, _ in proj.named_parameters()}


def _stage1_config(
    llm_config: dict,
    vision_config: dict,
    llm_dir: Path,
    vision_dir: Path,
    select_layer: int,
    downsample_ratio: float,
    ps_version: str,
    divisible_by: int,
) -> ModelConfig:
    problems: List[str] = []
    language = language_from_hf(
        llm_config, problems, prefix=f"{llm_dir / 'config.json'}", make_vocab_size_divisible_by=divisible_by
    )
    vision = vision_from_hf(vision_config, select_layer, problems, prefix=f"{vision_dir / 'config.json'}")
    cfg = ModelConfig(
        vision=vision,
        projector=ProjectorConfig(downsample_ratio=downsample_ratio, ps_version=ps_version),
        language=language,
    )
    if not problems:
        try:
            cfg.validate()
        except ConfigError as e:
            problems.append(str(e))
    raise_if(
        problems,
        "cannot build a stage-1 model from these folders",
        "pass a Qwen2/Qwen2.5 folder as --llm and an InternViT-300M style folder as --vision",
    )
    return cfg


def init_stage1(
    llm_dir,
    vision_dir,
    out_dir,
    tp: int = 1,
    pp: int = 1,
    select_layer: int = -4,
    downsample_ratio: float = 0.5,
    ps_version: str = "v2",
    template: str = "internvl2_5",
    tokenizer=None,
    dtype: str = "auto",
    seed: int = 1234,
    make_vocab_size_divisible_by: int = 128,
    image_token_id: Optional[int] = None,
) -> Path:
    """Build a stage-1 checkpoint: Qwen2 + InternViT weights, a fresh projector. Checks everything first
    (ConversionError listing all problems) and writes nothing on failure."""
    llm_dir, vision_dir, out_dir = Path(llm_dir), Path(vision_dir), Path(out_dir)
    check_output_free(out_dir)
    llm_config, vision_config = read_json(llm_dir / "config.json"), read_json(vision_dir / "config.json")
    cfg = _stage1_config(
        llm_config,
        vision_config,
        llm_dir,
        vision_dir,
        select_layer,
        downsample_ratio,
        ps_version,
        make_vocab_size_divisible_by,
    )
    llm, vit = SafetensorsFolder(llm_dir), SafetensorsFolder(vision_dir)
    lm_head_stored = cfg.language.tie_word_embeddings and "lm_head.weight" in llm.tensors
    llm_dtypes = {n: i.dtype for n, i in llm.tensors.items()}
    vit_dtypes = {n: i.dtype for n, i in vit.tensors.items()}
    lm_head = lm_head_stored or not cfg.language.tie_word_embeddings
    raise_if(
        tensor_problems(llm.shapes, mapping.language_shapes(cfg, prefix="", lm_head=lm_head), llm_dtypes, str(llm_dir))
        + tensor_problems(vit.shapes, mapping.vision_shapes(cfg, prefix=""), vit_dtypes, str(vision_dir)),
        "the weights do not match their config.json files",
        "check that each folder's config.json and safetensors files belong together",
    )
    check_layout(cfg, tp, pp)
    dtype = resolve_dtype(
        dtype, list(llm_dtypes.values()) + list(vit_dtypes.values()), source=f"{llm_dir} + {vision_dir}"
    )
    tok_dir = Path(tokenizer) if tokenizer is not None else llm_dir
    cfg.image_context_token_id = image_token_id if image_token_id is not None else find_token_id(tok_dir)
    if cfg.image_context_token_id is None:
        logger.warning(
            "the tokenizer in %s has no <IMG_CONTEXT> token: add <img>, </img>, <IMG_CONTEXT> before training", tok_dir
        )
    hf_config = hf_config_from_model(cfg, stage1_template(llm_config, vision_config, template, dtype), dtype)
    rows = target_vocab_rows(cfg, tp)
    with llm, vit, atomic_output_dir(out_dir) as tmp:
        unused = carry_unused(
            vit,
            mapping.unused_hf_names(cfg, prefix=""),
            tmp / HF_SOURCE_DIR,
            rename=lambda n: mapping.VISION_PREFIX + n,
        )
        extra = [llm_dir / "generation_config.json"] if (llm_dir / "generation_config.json").is_file() else []
        files = copy_files(tokenizer_files(tok_dir) + extra, tmp / HF_SOURCE_DIR)
        record = provenance(
            cfg,
            hf_config,
            dtype,
            tp,
            pp,
            rows,
            lm_head_stored,
            unused,
            files,
            f"{llm_dir.resolve()} + {vision_dir.resolve()}",
            "init",
        )
        with single_process(seed):
            model = build_empty_model(cfg, dtype, rows)
            filled = fill_params(model, vit, mapping.vision_rules(cfg, prefix=""), cfg)
            language = mapping.language_rules(cfg, prefix="", lm_head_stored=lm_head_stored)
            filled |= fill_params(model, llm, language, cfg)
            filled |= init_projector(model, seed)
            check_all_filled(model, filled)
            save_model(model, tmp, record)
            del model
    return out_dir
