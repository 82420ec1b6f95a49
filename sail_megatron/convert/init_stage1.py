"""`sail-convert init`: a fresh stage-1 SAIL-VL checkpoint from a language folder and a vision folder.

The language model (Qwen2 / Qwen2.5 or dense Qwen3: `model.*`/`lm_head.*`) and the vision encoder come
from their standalone Hugging Face releases: InternViT (`embeddings.*`/`encoder.layers.N.*`) or AIMv2 /
SAILViT, named either as apple/ml-aim does (`preprocessor.*`/`trunk.blocks.N.*`, as SAIL-VL checkpoints
hold them) or as transformers' `Aimv2VisionModel` does (`embeddings.patch_embed`, `encoder.layers.N.*`,
told apart by the tensor names and read under the ml-aim names; its attention-pooling `head.*`, unused by
SAIL-VL, is dropped). The projector (`mlp1`) is new, initialized as megatron-core initializes it in
training (normal(0, 0.02) for fc1, the scaled output init for fc2, zero biases, LayerNorm 1/0). The output
is laid out like `hf-to-mcore`'s, with a SAIL-VL / InternVL-chat config.json recorded for the later export
(which writes the vision encoder under the ml-aim names SAIL-VL uses).
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import torch

from sail_megatron.config import ConfigError, ModelConfig, ProjectorConfig
from sail_megatron.convert import mapping
from sail_megatron.convert.checks import check_layout, resolve_dtype, tensor_problems
from sail_megatron.convert.errors import ConversionError, raise_if
from sail_megatron.convert.hf_config import (
    hf_config_from_model,
    language_from_hf,
    read_json,
    stage1_template,
    vision_arch_of,
    vision_from_hf,
)
from sail_megatron.convert.hf_io import SafetensorsFolder, TensorInfo
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


@dataclass(frozen=True)
class _VirtualTensor:
    dtype: torch.dtype
    shape: Tuple[int, ...]


class AIMv2FromTransformers:
    """A standalone AIMv2 folder in transformers' `Aimv2VisionModel` names, seen under the ml-aim names
    (`mapping.aimv2_transformers_names`): q/k/v are read as the one stacked `attn.qkv`, the position table
    as `pos_embed` [1, N, H]. Tensors that fit no ml-aim name keep their own (and are reported as
    unexpected); the attention-pooling `head.*` is left out (`dropped`)."""

    def __init__(self, folder: SafetensorsFolder, cfg: ModelConfig):
        self.folder = folder
        self.sources: Dict[str, Tuple[str, ...]] = {}
        self.tensors: Dict[str, object] = {}
        used: Set[str] = set()
        for name in mapping.vision_shapes(cfg, prefix=""):
            parts = mapping.aimv2_transformers_names(name)
            if not all(p in folder.tensors for p in parts):
                continue
            infos = [folder.tensors[p] for p in parts]
            shape = mapping.aimv2_from_transformers_shape(name, [i.shape for i in infos])
            if shape is None or len({i.dtype for i in infos}) > 1:
                continue
            self.sources[name] = parts
            self.tensors[name] = _VirtualTensor(infos[0].dtype, shape)
            used.update(parts)
        self.dropped = sorted(n for n in folder.tensors if n.startswith(mapping.AIMV2_TRANSFORMERS_HEAD_PREFIX))
        for name, info in folder.tensors.items():
            if name not in used and name not in self.dropped:
                self.sources[name] = (name,)
                self.tensors[name] = info

    @staticmethod
    def applies(tensors: Dict[str, TensorInfo]) -> bool:
        """Whether a folder's tensors carry transformers' names rather than ml-aim's."""
        return not any(n.startswith(("trunk.", "preprocessor.")) for n in tensors) and any(
            n.startswith(("embeddings.patch_embed.", "encoder.layers.")) for n in tensors
        )

    @property
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {n: i.shape for n, i in self.tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        parts = self.sources[name]
        if parts == (name,):
            return self.folder.read(name)
        return mapping.aimv2_from_transformers(name, [self.folder.read(p) for p in parts])

    def close(self) -> None:
        self.folder.close()

    def __enter__(self) -> "AIMv2FromTransformers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_vision(vision_dir: Path, cfg: ModelConfig):
    """The vision folder's tensors under the names `mapping` expects of a standalone release."""
    folder = SafetensorsFolder(vision_dir)
    if cfg.vision.arch != "aimv2" or not AIMv2FromTransformers.applies(folder.tensors):
        return folder
    view = AIMv2FromTransformers(folder, cfg)
    if view.dropped:
        logger.warning(
            "%s: leaving out the attention-pooling head (%d tensors: %s): SAIL-VL reads the encoder's hidden "
            "states, not its pooled output",
            vision_dir,
            len(view.dropped),
            ", ".join(view.dropped),
        )
    return view


_FAMILY = {"internvit": "InternViT", "aimv2": "AIMv2 / SAILViT"}


def default_select_layer(vision_config: dict) -> int:
    """SAIL-VL's choice per encoder: -4 for InternViT (SAIL-VL-2B/8B), -1 for AIMv2 / SAILViT (SAIL-VL-1.6, SAIL-VL2)."""
    return -1 if vision_arch_of(vision_config) == "aimv2" else -4


def _stage1_config(
    llm_config: dict,
    vision_config: dict,
    llm_dir: Path,
    vision_dir: Path,
    select_layer: int,
    downsample_ratio: float,
    ps_version: str,
    divisible_by: int,
    select_layer_defaulted: bool = False,
) -> ModelConfig:
    what = "cannot build a stage-1 model from these folders"
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
    raise_if(
        problems,
        what,
        "pass a Qwen2/Qwen2.5, dense Qwen3 or Qwen3-MoE folder as --llm and an InternViT-300M style or AIMv2 / SAILViT "
        "folder as --vision",
    )
    try:
        cfg.validate()
    except ConfigError as e:  # the folders are of the right kind; a value of theirs or ours does not fit
        if e.field.endswith("vision.select_layer"):
            n = cfg.vision.num_layers
            given = f"--select-layer {select_layer}" + (
                f" (the default for {_FAMILY.get(cfg.vision.arch, cfg.vision.arch)})" if select_layer_defaulted else ""
            )
            raise ConversionError(
                what,
                [f"{given} leaves {cfg.vision.num_built_layers} of the {n} layers of {vision_dir}"],
                f"pass --select-layer with a value in [1, {n}] or [-{n}, -1]",
            ) from None
        raise ConversionError(what, [str(e)]) from None  # the config's message carries its own fix
    return cfg


def init_stage1(
    llm_dir,
    vision_dir,
    out_dir,
    tp: int = 1,
    pp: int = 1,
    select_layer: Optional[int] = None,
    downsample_ratio: float = 0.5,
    ps_version: str = "v2",
    template: str = "internvl2_5",
    tokenizer=None,
    dtype: str = "auto",
    seed: int = 1234,
    make_vocab_size_divisible_by: int = 128,
    image_token_id: Optional[int] = None,
) -> Path:
    """Build a stage-1 checkpoint: Qwen2/Qwen3 + InternViT/AIMv2 weights, a fresh projector. Checks everything
    first (ConversionError listing all problems) and writes nothing on failure. `select_layer` None: the
    encoder family's SAIL-VL choice (`default_select_layer`)."""
    llm_dir, vision_dir, out_dir = Path(llm_dir), Path(vision_dir), Path(out_dir)
    check_output_free(out_dir)
    llm_config, vision_config = read_json(llm_dir / "config.json"), read_json(vision_dir / "config.json")
    defaulted = select_layer is None
    if select_layer is None:
        select_layer = default_select_layer(vision_config)
    cfg = _stage1_config(
        llm_config,
        vision_config,
        llm_dir,
        vision_dir,
        select_layer,
        downsample_ratio,
        ps_version,
        make_vocab_size_divisible_by,
        select_layer_defaulted=defaulted,
    )
    llm, vit = SafetensorsFolder(llm_dir), _open_vision(vision_dir, cfg)
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
