"""`sail-convert mcore-to-hf --format transformers`: a megatron checkpoint -> a folder transformers loads with
its own classes: `AutoModelForImageTextToText` (`InternVLForConditionalGeneration`) and `AutoProcessor`, no
remote code.

The checkpoint is read as for the InternVL-chat export (to_hf.py: the same sources and checks, any TP/PP, the
ViT layers after select_layer carried when there is a source); names, config and processor files follow
transformers' layout (transformers_layout.py, which also says which models it cannot represent). The folder:
config.json, generation_config.json, safetensors shards + index, the tokenizer (with its chat template and
image-token names), chat_template.jinja, preprocessor_config.json and processor_config.json.

Chat template (`chat_template` in tokenizer_config.json and chat_template.jinja): the one the model was trained
with, rendered as in training (`data/templates.py`): --template, else the run's `data.template` (with its
`data.system_prompt`) from config.yaml, else the `template` an InternVL-chat config.json records (a converted
release). Tiling: the run's `data.min_tiles` / `max_tiles`, else config.json's `min_dynamic_patch` /
`max_dynamic_patch`, else the trainer's defaults.
"""

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from sail_megatron.config.data import DataConfig
from sail_megatron.convert import transformers_layout as layout
from sail_megatron.convert.errors import ConversionError, raise_if
from sail_megatron.convert.hf_config import data_from_hf_config, read_json, write_json
from sail_megatron.convert.outputs import atomic_output_dir, copy_files
from sail_megatron.convert.to_hf import ExportSource, export_tokenizer, loaded_model, plan_export, write_weights
from sail_megatron.convert.tokens import find_token_id
from sail_megatron.data.templates import TEMPLATES, chat_template_jinja
from sail_megatron.data.tokenizer import ENDOFTEXT, IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START

logger = logging.getLogger(__name__)

REQUIRED_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, IM_START, IM_END)
_REWRITTEN_TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")


def _token_ids(files: List[Path]) -> Dict[str, int]:
    """The ids of the image and chat tokens (and <|endoftext|> when present) in the export's tokenizer."""
    if not files:
        raise ConversionError(
            "no tokenizer for the transformers export",
            ["its processor and config.json's image_token_id need the tokenizer the model was trained with"],
            "pass --tokenizer DIR (the run's data.tokenizer)",
        )
    folder = files[0].parent
    ids = {token: find_token_id(folder, token) for token in (*REQUIRED_TOKENS, ENDOFTEXT)}
    raise_if(
        [f"{folder} has no {token} token" for token in REQUIRED_TOKENS if ids[token] is None],
        "the tokenizer does not fit the transformers export",
        f"use the tokenizer the model was trained with (it has {', '.join(REQUIRED_TOKENS)})",
    )
    return {token: i for token, i in ids.items() if i is not None}


def _trained_data(src: ExportSource) -> Optional[DataConfig]:
    """How the model was fed: the run's data settings, else what an InternVL-chat config.json records."""
    if src.run_data is not None:
        return src.run_data
    return data_from_hf_config(src.template) if src.template else None


def _chat_template(src: ExportSource, template: Optional[str]) -> Tuple[str, Optional[str]]:
    """(template name, system prompt) the model was trained with; --template overrides the name."""
    data = _trained_data(src)
    system = data.system_prompt if data is not None else None
    if template is not None:
        name, where = template, "--template"
    elif src.run_data is not None:
        name, where = src.run_data.template, "data.template in the run's config.yaml"
    elif data is not None and data.template:
        name, where = data.template, "the model's config.json"
    else:
        raise ConversionError(
            "no chat template for the transformers export",
            ["the checkpoint records none (no training config.yaml, no `template` in an InternVL-chat config.json)"],
            f"pass --template with the one the model was trained with: {', '.join(TEMPLATES)}",
        )
    if name not in TEMPLATES:
        raise ConversionError(
            f"unknown chat template {name!r} ({where})",
            [f"the export writes the templates the trainer renders: {', '.join(TEMPLATES)}"],
            "pass --template with the one the model was trained with",
        )
    logger.info("chat template %s (from %s)", name, where)
    return name, system


def _tiling(src: ExportSource) -> Tuple[int, int]:
    """(min, max) tiles per image: the run's data settings, else the InternVL-chat config's (absent keys take
    InternVLChatConfig's defaults: no dynamic tiling, no thumbnail), else the trainer's defaults. The processor
    adds a thumbnail after several tiles (it has no switch): says so when the model was trained without one."""
    data = _trained_data(src) or DataConfig()
    tiles, thumbnail = (data.min_tiles, data.max_tiles), data.use_thumbnail
    if not thumbnail and tiles[1] > 1:
        logger.warning(
            "the model was trained without a thumbnail tile, but transformers' image processor always adds one "
            "after several tiles: the exported processor gives one tile more per tiled image"
        )
    return tiles


def _write_tokenizer(files: List[Path], chat_template: str, out: Path) -> None:
    """The tokenizer files, tokenizer_config.json with the chat template and image-token names, and
    chat_template.jinja (where the processor reads its template)."""
    copy_files([p for p in files if p.name not in _REWRITTEN_TOKENIZER_FILES], out)
    source = files[0].parent / "tokenizer_config.json"
    write_json(
        out / "tokenizer_config.json",
        layout.tokenizer_config(read_json(source) if source.is_file() else {}, chat_template),
    )
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def mcore_to_transformers(
    ckpt,
    out_dir,
    tokenizer=None,
    base_hf=None,
    dtype: Optional[str] = None,
    max_shard_size: str = "5GB",
    template: Optional[str] = None,
) -> Path:
    """Export a megatron checkpoint (from sail-convert or the trainer) as a transformers-native InternVL folder.
    Refuses, before anything is built, what transformers' InternVL cannot represent."""
    plan = plan_export(
        ckpt, out_dir, tokenizer, base_hf, dtype, max_shard_size, check=lambda src: layout.check_supported(src.cfg)
    )
    try:
        files = export_tokenizer(plan.src, plan.tokenizer)
        ids = _token_ids(files)
        jinja = chat_template_jinja(*_chat_template(plan.src, template))
        min_tiles, max_tiles = _tiling(plan.src)
        cfg = plan.export_cfg
        eos = [ids[t] for t in (IM_END, ENDOFTEXT) if t in ids]
        with atomic_output_dir(Path(out_dir)) as tmp:
            with loaded_model(plan) as model:
                write_weights(model, plan, tmp, layout.transformers_shapes(cfg), False, layout.to_transformers)
                del model
            write_json(tmp / "config.json", layout.transformers_config(cfg, plan.dtype, ids[IMG_CONTEXT]))
            write_json(tmp / "generation_config.json", layout.generation_config(eos, ids.get(ENDOFTEXT)))
            write_json(tmp / "preprocessor_config.json", layout.image_processor_config(cfg, min_tiles, max_tiles))
            write_json(tmp / "processor_config.json", layout.processor_config(cfg))
            _write_tokenizer(files, jinja, tmp)
    finally:
        plan.close()
    return Path(out_dir)
