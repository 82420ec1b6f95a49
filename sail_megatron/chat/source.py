"""What `--ckpt` names, and how the model behind it was fed: its model config, where its weights are, and
the data settings (tokenizer, chat template, system message, tiling) its prompts must be rendered with.

    a training run folder      config.yaml + `latest`: the run's model and data config
    one of its iter_* folders  the same, that checkpoint
    a sail-convert checkpoint  (hf-to-mcore, init) its conversion record and hf_source/ tokenizer
    an InternVL-chat folder    config.json (`internvl_chat` or `sailvl`) + safetensors + tokenizer, as
                               `sail-convert mcore-to-hf` writes it: template and tiling from config.json

Nothing here builds a model or loads a tensor: every problem with the input is found first.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from sail_megatron.chat.errors import ChatError
from sail_megatron.config import ConfigError, ModelConfig
from sail_megatron.config.data import TEMPLATES, DataConfig
from sail_megatron.config.loading import from_dict
from sail_megatron.config.model import padded_vocab_size
from sail_megatron.convert import mapping
from sail_megatron.convert.checks import check_tensors, stored_dtype
from sail_megatron.convert.hf_config import data_from_hf_config, model_config_from_hf, read_json
from sail_megatron.convert.hf_io import SafetensorsFolder
from sail_megatron.convert.mcore_io import HF_SOURCE_DIR, checkpoint_root, read_provenance
from sail_megatron.convert.outputs import tokenizer_files
from sail_megatron.convert.run_paths import find_recorded_folder
from sail_megatron.training.checkpoint_files import COMMON, DCP_METADATA, METADATA_JSON, check_checkpoint
from sail_megatron.training.run_dir import LATEST

RUN_CONFIG = "config.yaml"
TRANSFORMERS_INTERNVL = "internvl"
"""model_type of transformers' own InternVL layout (`InternVLForConditionalGeneration`)."""
_WHAT = "pass a training run folder, one of its iter_* folders, or a Hugging Face InternVL-chat folder"


@dataclass
class ChatSource:
    kind: str
    """'run' (trainer checkpoint), 'converted' (written by sail-convert) or 'hf' (InternVL-chat folder)."""
    weights: Path
    """The iter_* checkpoint folder, or the Hugging Face folder."""
    model: ModelConfig
    stored_dtype: str
    """'fp32', 'bf16' or 'fp16': the dtype of the stored weights."""
    vocab_rows: int
    """Rows of the embedding and output layer in the checkpoint (megatron's padded vocabulary)."""
    data: DataConfig
    """tokenizer, template, system_prompt, min/max_tiles, use_thumbnail, max_pixels as the model was fed."""
    lm_head_stored: bool = False
    """Hugging Face folders with tied embeddings that also store lm_head.weight."""
    trained_seq_length: Optional[int] = None
    """The run's data.seq_length (runs only): prompts plus answers longer than this were never trained."""
    ckpt: Optional[Path] = None
    """What --ckpt named (megatron checkpoints): the model loads from it, so a run folder gives the newest
    checkpoint at load time, also when its training has pruned `weights` since."""


def resolve_source(
    ckpt,
    tokenizer: Optional[str] = None,
    template: Optional[str] = None,
    system: Optional[str] = None,
    max_tiles: Optional[int] = None,
) -> ChatSource:
    """The source `ckpt` names, with the command line's overrides applied. Raises ChatError (or the
    converter's and checkpoint checks' own errors) for anything unusable."""
    path = Path(ckpt)
    if not path.exists():
        raise ChatError(f"--ckpt {path} does not exist")
    if not path.is_dir():
        raise ChatError(f"--ckpt {path} is a file: {_WHAT}")
    if (path / "config.json").is_file():
        src = _hf_source(path)
    elif _holds_checkpoint(path):
        src = _megatron_source(path)
    else:
        raise ChatError(
            f"--ckpt {path} is neither a training run nor a checkpoint nor a Hugging Face model folder "
            f"(no {RUN_CONFIG}, `{LATEST}`, iter_* folders, checkpoint files or config.json): {_WHAT}"
        )
    return _with_overrides(src, tokenizer, template, system, max_tiles)


def _holds_checkpoint(path: Path) -> bool:
    names = (RUN_CONFIG, LATEST, METADATA_JSON, COMMON, DCP_METADATA)
    return any((path / n).exists() for n in names) or any(p.is_dir() for p in path.glob("iter_*"))


def _megatron_source(path: Path) -> ChatSource:
    folder = check_checkpoint(path)  # a damaged checkpoint is reported before anything else
    for root in (checkpoint_root(path), folder.parent):
        if (root / RUN_CONFIG).is_file():
            return dataclasses.replace(_run_source(folder, root / RUN_CONFIG), ckpt=path)
    record = read_provenance(path)
    if record is not None:
        return dataclasses.replace(_converted_source(folder, checkpoint_root(path), record), ckpt=path)
    raise ChatError(
        f"--ckpt {path}: cannot tell the model of {folder}: no training {RUN_CONFIG} beside it and no "
        "sail-convert record in it"
    )


def _run_source(folder: Path, run_config: Path) -> ChatSource:
    from sail_megatron.config.train import resolve

    try:
        train = resolve(yaml.safe_load(run_config.read_text()))
    except (ConfigError, yaml.YAMLError, TypeError, ValueError, KeyError) as e:
        raise ChatError(f"{run_config}: cannot read the run's config ({e})") from None
    lang = train.model.language
    rows = padded_vocab_size(
        lang.vocab_size, lang.make_vocab_size_divisible_by, train.parallel.tensor_model_parallel_size
    )
    data = train.data
    if data.tokenizer:  # as recorded, maybe relative to where the training ran (convert/run_paths.py)
        found = find_recorded_folder(data.tokenizer, run_config.parent, train.run.save_dir)
        data = dataclasses.replace(data, tokenizer=str(found)) if found is not None else data
    return ChatSource(
        kind="run",
        weights=folder,
        model=train.model,
        stored_dtype=train.precision.dtype,
        vocab_rows=rows,
        data=data,
        trained_seq_length=train.data.seq_length,
    )


def _converted_source(folder: Path, root: Path, record: Dict[str, Any]) -> ChatSource:
    side = root / HF_SOURCE_DIR
    hf_config = record.get("hf_config") or {}
    return ChatSource(
        kind="converted",
        weights=folder,
        model=from_dict(ModelConfig, record["model"], "model"),
        stored_dtype=record["dtype"],
        vocab_rows=record["vocab_rows"],
        data=data_from_hf_config(hf_config, side if tokenizer_files(side) else None),
        lm_head_stored=record.get("lm_head_stored", False),
    )


def _hf_source(folder: Path) -> ChatSource:
    config = read_json(folder / "config.json")
    if config.get("model_type") == TRANSFORMERS_INTERNVL:
        raise ChatError(
            f"--ckpt {folder} is in transformers' own InternVL format (model_type 'internvl', as "
            "`sail-convert mcore-to-hf --format transformers` writes it), which sail-chat does not read yet: "
            "pass the training checkpoint or an InternVL-chat export (sail-convert mcore-to-hf without --format)"
        )
    cfg = model_config_from_hf(config, source=str(folder / "config.json"))
    with SafetensorsFolder(folder) as weights:
        dtypes = {name: info.dtype for name, info in weights.tensors.items()}
        lm_head_stored = cfg.language.tie_word_embeddings and f"{mapping.LLM_PREFIX}lm_head.weight" in dtypes
        check_tensors(weights.shapes, mapping.expected_hf_shapes(cfg, lm_head_stored), dtypes, str(folder))
    return ChatSource(
        kind="hf",
        weights=folder,
        model=cfg,
        stored_dtype=stored_dtype(list(dtypes.values())),
        vocab_rows=cfg.language.padded_vocab_size(1),
        data=data_from_hf_config(config, folder if tokenizer_files(folder) else None),
        lm_head_stored=lm_head_stored,
    )


def _with_overrides(
    src: ChatSource, tokenizer: Optional[str], template: Optional[str], system: Optional[str], max_tiles: Optional[int]
) -> ChatSource:
    data = dataclasses.replace(src.data)
    where = "the run's config" if src.kind == "run" else f"{src.weights}"
    if tokenizer is not None:
        data.tokenizer = str(tokenizer)
    if not data.tokenizer:
        raise ChatError(f"{where} names no tokenizer: pass --tokenizer DIR")
    if not Path(data.tokenizer).is_dir():
        if tokenizer is not None:
            raise ChatError(f"--tokenizer {data.tokenizer} is not a folder")
        elsewhere = (
            " (nor under the folder the training ran in, nor in the run folder)"
            if src.kind == "run" and not Path(data.tokenizer).is_absolute()
            else ""
        )
        raise ChatError(
            f"{where} names the tokenizer {data.tokenizer}, which is not a folder here{elsewhere}: pass --tokenizer DIR"
        )
    if template is not None:
        data.template = template
    if data.template not in TEMPLATES:
        said = (
            f"names the chat template {data.template!r}, which sail-chat cannot render"
            if data.template
            else ("names no chat template")
        )
        raise ChatError(f"{where} {said}: pass --template, one of {', '.join(TEMPLATES)}")
    if system is not None:
        data.system_prompt = system
    if max_tiles is not None:
        data.max_tiles = max_tiles
        data.min_tiles = min(data.min_tiles, max_tiles)
    return dataclasses.replace(src, data=data)
