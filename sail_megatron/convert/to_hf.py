"""`sail-convert mcore-to-hf`: a megatron checkpoint -> an InternVL-chat (SAIL-VL) Hugging Face folder.

What the model config, the config.json template and the ViT layers after `select_layer` come from, in
order: the checkpoint's own conversion record and `hf_source/` (checkpoints written by sail-convert);
a training run's `config.yaml` (checkpoints written by the trainer); `--base-hf` (the HF folder or the
converted checkpoint the run started from). Without a source for the unused ViT layers an InternViT
export drops them and config.json says so (`num_hidden_layers` = built layers, `select_layer` = -1: the
same model); an AIMv2 encoder cannot be cut that way (select_layer -1 would add its final norm), so its
export asks for the source.
Vocabulary padding is removed; weights stream out one tensor at a time into safetensors shards + index.
The checks, the checkpoint reading and the tensor stream (`plan_export`, `loaded_model`, `hf_tensors`) also
serve `--format transformers` (to_transformers.py).
"""

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import yaml

from sail_megatron.config import ModelConfig
from sail_megatron.config.data import DataConfig
from sail_megatron.config.loading import from_dict
from sail_megatron.config.model import padded_vocab_size
from sail_megatron.convert import mapping
from sail_megatron.convert.checks import DTYPE_OPTIONS, stored_dtype, tensor_problems
from sail_megatron.convert.errors import ConversionError, raise_if
from sail_megatron.convert.hf_config import (
    TRAINED_PROMPT_KEY,
    hf_config_from_model,
    model_config_from_hf,
    read_json,
    stage1_template,
    write_json,
)
from sail_megatron.convert.hf_io import SafetensorsFolder, ShardedSafetensorsWriter, parse_size
from sail_megatron.convert.mcore_io import (
    HF_SOURCE_DIR,
    UNUSED_TENSORS_FILE,
    build_empty_model,
    checkpoint_root,
    load_model,
    read_provenance,
    single_process,
)
from sail_megatron.convert.outputs import (
    TOKENIZER_FILES,
    atomic_output_dir,
    check_output_free,
    copy_files,
    side_files,
    tokenizer_files,
)
from sail_megatron.convert.run_paths import find_recorded_folder
from sail_megatron.training.checkpoint_files import check_checkpoint

if TYPE_CHECKING:
    from sail_megatron.model.sail_vl import SailVLModel

logger = logging.getLogger(__name__)


@dataclass
class ExportSource:
    """Everything an export needs besides the checkpoint's tensors."""

    cfg: ModelConfig
    ckpt_dtype: str
    vocab_rows: int
    template: Dict
    lm_head_stored: bool = False
    unused_dir: Optional[Path] = None
    """A folder whose safetensors hold the ViT layers after select_layer (InternVL-chat names)."""
    side_dir: Optional[Path] = None
    """A folder whose small files (tokenizer, modelling code) go with the export."""
    run_tokenizer: Optional[Path] = None
    """The tokenizer a training run recorded (`data.tokenizer` in its config.yaml)."""
    run_data: Optional[DataConfig] = None
    """A training run's data settings (chat template, tiling), from its config.yaml."""


def _converted_source(root: Path, record: Dict) -> ExportSource:
    source = root / HF_SOURCE_DIR
    return ExportSource(
        cfg=from_dict(ModelConfig, record["model"], "model"),
        ckpt_dtype=record["dtype"],
        vocab_rows=record["vocab_rows"],
        template=record["hf_config"],
        lm_head_stored=record.get("lm_head_stored", False),
        unused_dir=source if record.get("unused_tensors") and (source / UNUSED_TENSORS_FILE).is_file() else None,
        side_dir=source if source.is_dir() else None,
    )


def _run_source(run_config: Path) -> ExportSource:
    from sail_megatron.config.train import resolve

    train = resolve(yaml.safe_load(run_config.read_text()))
    tokenizer = None
    if train.data.tokenizer:  # as recorded, maybe relative to where the training ran (run_paths.py)
        found = find_recorded_folder(train.data.tokenizer, run_config.parent, train.run.save_dir)
        tokenizer = found or Path(train.data.tokenizer)
    lang = train.model.language
    rows = padded_vocab_size(
        lang.vocab_size, lang.make_vocab_size_divisible_by, train.parallel.tensor_model_parallel_size
    )
    return ExportSource(
        cfg=train.model,
        ckpt_dtype=train.precision.dtype,
        vocab_rows=rows,
        template={},
        run_tokenizer=tokenizer,
        run_data=train.data,
    )


def _hf_source(hf_dir: Path) -> ExportSource:
    config = read_json(hf_dir / "config.json")
    cfg = model_config_from_hf(config, source=str(hf_dir / "config.json"))
    with SafetensorsFolder(hf_dir) as folder:
        dtype = stored_dtype([i.dtype for i in folder.tensors.values()])
        head = f"{mapping.LLM_PREFIX}lm_head.weight" in folder.tensors
    rows = padded_vocab_size(cfg.language.vocab_size, cfg.language.make_vocab_size_divisible_by, 1)
    return ExportSource(
        cfg=cfg,
        ckpt_dtype=dtype,
        vocab_rows=rows,
        template=config,
        lm_head_stored=cfg.language.tie_word_embeddings and head,
        unused_dir=hf_dir,
        side_dir=hf_dir,
    )


def _base_source(base: Path) -> ExportSource:
    """--base-hf: a Hugging Face folder or a folder written by sail-convert."""
    if (base / "latest").is_file() or (base / HF_SOURCE_DIR).is_dir():
        record = read_provenance(base)
        if record is None:
            raise ConversionError(
                f"--base-hf {base}",
                ["it is a megatron checkpoint without a conversion record"],
                "pass the Hugging Face folder the run started from",
            )
        return _converted_source(checkpoint_root(base), record)
    return _hf_source(base)


def resolve_export_source(ckpt: Path, base_hf: Optional[Path] = None) -> ExportSource:
    """Where the config, template, unused ViT layers and side files of an export come from."""
    root = checkpoint_root(ckpt)
    record = read_provenance(ckpt)
    base = _base_source(Path(base_hf)) if base_hf is not None else None
    if record is not None:
        src = _converted_source(root, record)
    elif (root / "config.yaml").is_file():
        src = _run_source(root / "config.yaml")
    elif base is not None:
        src = dataclasses.replace(base, unused_dir=None, side_dir=None)
    else:
        raise ConversionError(
            f"cannot tell the model of {ckpt}",
            ["the checkpoint has no sail-convert record and its folder no training config.yaml"],
            "pass --base-hf with the Hugging Face model the run started from",
        )
    if base is not None:
        # The base fills what the checkpoint lacks; it must describe the same vision encoder.
        if not src.template:
            src.template = base.template
            src.lm_head_stored = base.lm_head_stored and src.cfg.language.tie_word_embeddings
        if src.unused_dir is None and base.unused_dir is not None and _same_vision(src.cfg, base.cfg):
            src.unused_dir = base.unused_dir
        src.side_dir = src.side_dir or base.side_dir
    return src


def _same_vision(a: ModelConfig, b: ModelConfig) -> bool:
    return dataclasses.replace(a.vision, drop_path_rate=0.0) == dataclasses.replace(b.vision, drop_path_rate=0.0)


def truncated(cfg: ModelConfig) -> ModelConfig:
    """The same model described without the ViT layers after select_layer."""
    vision = dataclasses.replace(cfg.vision, num_layers=cfg.vision.num_built_layers, select_layer=-1)
    return dataclasses.replace(cfg, vision=vision)


def _unused_folder(src: ExportSource) -> Optional[SafetensorsFolder]:
    if src.unused_dir is None or not mapping.unused_hf_names(src.cfg):
        return None
    folder = SafetensorsFolder(src.unused_dir)
    names = mapping.unused_hf_names(src.cfg)
    expected = {n: s for n, s in mapping.vision_shapes(src.cfg).items() if n in set(names)}
    actual = {n: folder.shapes[n] for n in names if n in folder.shapes}
    raise_if(tensor_problems(actual, expected, {}), f"the unused ViT layers in {src.unused_dir} do not fit the model")
    return folder


@dataclass
class ExportPlan:
    """What an export writes, settled (and checked) before any model is built."""

    ckpt: Path
    src: ExportSource
    dtype: str
    """Output dtype: 'bf16', 'fp32' or 'fp16'."""
    export_cfg: ModelConfig
    """The model as written: `src.cfg`, or `truncated(src.cfg)` when the ViT layers after select_layer have no
    source."""
    unused: Optional[SafetensorsFolder]
    """The carried ViT layers after select_layer (InternVL-chat names), when there is a source for them."""
    shard_bytes: int
    tokenizer: Optional[Path]
    """--tokenizer, checked to hold tokenizer files."""

    def close(self) -> None:
        if self.unused is not None:
            self.unused.close()


def plan_export(
    ckpt,
    out_dir,
    tokenizer=None,
    base_hf=None,
    dtype: Optional[str] = None,
    max_shard_size: str = "5GB",
    check: Optional[Callable[[ExportSource], None]] = None,
) -> ExportPlan:
    """Every input check of an export, in order, before anything is written; `check(src)` adds an output
    format's own refusals right after the model's source is known. Close the plan when done."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    check_output_free(out_dir)
    shard_bytes = _shard_bytes(max_shard_size)
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    if tokenizer is not None and not tokenizer_files(tokenizer):
        raise ConversionError(
            f"--tokenizer {tokenizer}", ["no tokenizer files there (tokenizer.json, vocab.json, ...)"]
        )
    check_checkpoint(ckpt)  # a damaged checkpoint is reported before any model is built
    src = resolve_export_source(ckpt, base_hf)
    if check is not None:
        check(src)
    out_dtype = dtype or src.ckpt_dtype
    raise_if(
        [] if out_dtype in DTYPE_OPTIONS else [f"unknown dtype {out_dtype!r}"],
        "bad --dtype",
        f"use one of {', '.join(DTYPE_OPTIONS)}",
    )
    unused = _unused_folder(src)
    export_cfg = src.cfg if unused is not None or not mapping.unused_hf_names(src.cfg) else truncated(src.cfg)
    if export_cfg is not src.cfg and src.cfg.vision.arch == "aimv2":
        raise ConversionError(
            "no source for the unused AIMv2 tensors",
            [
                f"select_layer {src.cfg.vision.select_layer} leaves {len(mapping.unused_hf_names(src.cfg))} tensors "
                "of the release (the blocks after it and trunk.post_trunk_norm) outside the checkpoint, and a "
                "shorter AIMv2 with select_layer -1 would apply post_trunk_norm: not the same model"
            ],
            "pass --base-hf with the Hugging Face folder (or converted checkpoint) the run started from",
        )
    if export_cfg is not src.cfg:
        logger.warning(
            "no source for the %d ViT layers after select_layer: exporting the %d built layers with "
            "select_layer=-1 (same model); pass --base-hf to carry them",
            src.cfg.vision.num_layers - src.cfg.vision.num_built_layers,
            src.cfg.vision.num_built_layers,
        )
    return ExportPlan(ckpt, src, out_dtype, export_cfg, unused, shard_bytes, tokenizer)


@contextmanager
def loaded_model(plan: ExportPlan) -> Iterator["SailVLModel"]:
    """The checkpoint's weights (written under any TP/PP) in the single-process TP1/PP1 model."""
    with single_process():
        model = build_empty_model(plan.src.cfg, plan.src.ckpt_dtype, plan.src.vocab_rows)
        load_model(model, plan.ckpt)
        yield model


def hf_tensors(model: torch.nn.Module, plan: ExportPlan, lm_head_stored: bool) -> Iterator[Tuple[str, torch.Tensor]]:
    """The export's tensors under InternVL-chat names, one at a time (call under torch.no_grad): the full
    (TP1) values with the vocabulary padding removed, then the carried ViT layers after select_layer.
    `lm_head_stored`: also give `lm_head.weight` for tied embeddings."""
    params = dict(model.named_parameters())
    for rule in mapping.tensor_rules(plan.src.cfg, lm_head_stored):
        yield from zip(rule.hf, mapping.to_hf(rule, params[rule.mcore].detach(), plan.src.cfg))
    if plan.unused is not None:
        for name in mapping.unused_hf_names(plan.src.cfg):
            yield name, plan.unused.read(name)


def write_weights(
    model: torch.nn.Module,
    plan: ExportPlan,
    out: Path,
    shapes: Dict[str, Tuple[int, ...]],
    lm_head_stored: bool,
    rename: Optional[Callable[[str, torch.Tensor], Dict[str, torch.Tensor]]] = None,
) -> None:
    """Stream the model's parameters (and carried tensors) into safetensors shards planned from `shapes`;
    `rename` turns each InternVL-chat tensor into the output layout's tensors (default: kept as is)."""
    dtype = DTYPE_OPTIONS[plan.dtype]
    writer = ShardedSafetensorsWriter(out, [(n, dtype, s) for n, s in shapes.items()], plan.shard_bytes)
    try:
        with torch.no_grad():
            for name, value in hf_tensors(model, plan, lm_head_stored):
                for out_name, tensor in (rename(name, value) if rename else {name: value}).items():
                    writer.write(out_name, tensor.to(dtype))
    except BaseException:
        writer.abandon()
        raise
    writer.close()


def _side_files(src: ExportSource) -> List[Path]:
    """Carried small files other than the tokenizer (chosen on its own: files of two tokenizers never mix)."""
    if src.side_dir is None:
        return []
    return [p for p in side_files(src.side_dir) if p.name != UNUSED_TENSORS_FILE and p.name not in TOKENIZER_FILES]


def export_tokenizer(src: ExportSource, tokenizer: Optional[Path]) -> List[Path]:
    """The tokenizer files of the export: --tokenizer, else the one the training run recorded, else the
    carried one (sail-convert's hf_source/ or --base-hf). Says so when there is none."""
    if tokenizer is not None:
        return tokenizer_files(tokenizer)
    if src.run_tokenizer is not None:
        files = tokenizer_files(src.run_tokenizer) if src.run_tokenizer.is_dir() else []
        if files:
            logger.info("tokenizer from the run's config.yaml: %s", src.run_tokenizer)
            return files
        logger.warning(
            "the run's config.yaml names the tokenizer %s, but it holds no tokenizer files here", src.run_tokenizer
        )
    carried = tokenizer_files(src.side_dir) if src.side_dir is not None else []
    if not carried:
        logger.warning("the export has no tokenizer: pass --tokenizer DIR (or --base-hf with one) to include it")
    return carried


def _shard_bytes(max_shard_size) -> int:
    try:
        return parse_size(max_shard_size)
    except ValueError as e:
        raise ConversionError("bad --max-shard-size", [str(e)]) from None


# Chat templates InternVL-chat's remote code (conversation.py) knows by name; others are recorded as the
# closest it knows, and the export says so.
REMOTE_CODE_TEMPLATES = ("internvl2_5", "sailvl-chat", "univl-chat")


def _run_template(data: Optional[DataConfig], dtype: str) -> Dict:
    """A fresh InternVL-chat config whose prompt and tiling settings are the training run's."""
    if data is None:
        return stage1_template({}, {}, "internvl2_5", dtype)
    name = data.template if data.template in REMOTE_CODE_TEMPLATES else "internvl2_5"
    if name != data.template:
        logger.warning(
            "the run trained with data.template %r, which InternVL-chat's remote code does not know: config.json "
            "names %r (sail-chat reads the trained one from its %s; --format transformers exports carry it "
            "as their chat template)",
            data.template,
            name,
            TRAINED_PROMPT_KEY,
        )
    template = stage1_template({}, {}, name, dtype)
    template.update(
        use_thumbnail=data.use_thumbnail, min_dynamic_patch=data.min_tiles, max_dynamic_patch=data.max_tiles
    )
    template[TRAINED_PROMPT_KEY] = {"template": data.template, "system_prompt": data.system_prompt}
    return template


def mcore_to_hf(
    ckpt, out_dir, tokenizer=None, base_hf=None, dtype: Optional[str] = None, max_shard_size: str = "5GB"
) -> Path:
    """Export a megatron checkpoint (from sail-convert or the trainer) as an InternVL-chat HF folder:
    safetensors shards + index, config.json, tokenizer and other carried files."""
    plan = plan_export(ckpt, out_dir, tokenizer, base_hf, dtype, max_shard_size)
    src = plan.src
    try:
        # No template (trainer checkpoint, no --base-hf): a fresh InternVL-chat config with every field explicit.
        template = src.template or _run_template(src.run_data, plan.dtype)
        config = hf_config_from_model(plan.export_cfg, template, plan.dtype)
        with atomic_output_dir(Path(out_dir)) as tmp:
            with loaded_model(plan) as model:
                shapes = mapping.expected_hf_shapes(plan.export_cfg, src.lm_head_stored)
                write_weights(model, plan, tmp, shapes, src.lm_head_stored)
                del model
            write_json(tmp / "config.json", config)
            copy_files(_side_files(src) + export_tokenizer(src, plan.tokenizer), tmp)
    finally:
        plan.close()
    return Path(out_dir)
