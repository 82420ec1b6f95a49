"""The megatron side of conversion: one CPU process (TP1/PP1), an uninitialized model, checkpoint I/O.

A dist_checkpointing checkpoint stores every tensor by global shape and offset, so one written by a
single process loads under any TP/PP (the TP2/PP2 tests prove it). The SwiGLU `linear_fc1` is normally
saved through a factory that splits each layer into gate/up *views*; megatron's writer clones every
view before writing (1.5 GB extra for the 2B model), so at TP1 we describe fc1 as the one whole tensor
it is in the global layout `[gate; up]`, which is byte-for-byte the same checkpoint without the copies.
"""

import dataclasses
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

import torch

from sail_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig
from sail_megatron.convert.errors import ConversionError
from sail_megatron.training.checkpoint_files import read_checkpoint, resolve_checkpoint_folder

if TYPE_CHECKING:  # megatron-core is imported only when a model is built: input checks stay fast
    from sail_megatron.model.sail_vl import SailVLModel

PROVENANCE_KEY = "sail_convert"
FORMAT_VERSION = 1
HF_SOURCE_DIR = "hf_source"
"""Folder beside the megatron checkpoint: tokenizer, modelling code and the unused ViT layers."""
UNUSED_TENSORS_FILE = "unused_vision_layers.safetensors"
# Image-token id used only to satisfy the model builder where none is known (weights do not depend on it).
PLACEHOLDER_IMAGE_TOKEN_ID = 0


def hide_cuda() -> None:
    """Conversion builds megatron-core's local (CPU) layers whatever the machine, so parameter names are
    always the same; must run before anything touches CUDA in this process."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def single_process(seed: int = 1234) -> Iterator[None]:
    """torch.distributed and megatron-core's parallel state for one CPU process (gloo, TP1/PP1)."""
    import torch.distributed as dist

    from sail_megatron.platform import destroy_distributed, init_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConversionError(
            "sail-convert runs as one process", [f"WORLD_SIZE is {os.environ['WORLD_SIZE']}"], "run it without torchrun"
        )
    hide_cuda()
    if torch.cuda.is_available():
        raise RuntimeError("CUDA was initialized before conversion started; run sail-convert in a fresh process")
    if not dist.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    init_distributed(ParallelConfig(), seed=seed)
    try:
        yield
    finally:
        destroy_distributed()


def build_empty_model(cfg: ModelConfig, dtype: str, vocab_rows: Optional[int] = None) -> "SailVLModel":
    """The whole model in one process with megatron-core's local (CPU) layers, weights uninitialized
    (random init of a 2B model would cost minutes for values overwritten right after). `vocab_rows` sets
    the padded vocabulary (the padding a target TP needs, or what a checkpoint holds)."""
    from sail_megatron.model.sail_vl import SailVLModel
    from sail_megatron.model.specs import build_specs
    from sail_megatron.model.transformer_configs import PartConfigs, build_part_configs
    from sail_megatron.platform.backends import Backends

    cfg = dataclasses.replace(cfg, language=dataclasses.replace(cfg.language))
    if vocab_rows is not None:
        # At TP1 the padded size is the next multiple of make_vocab_size_divisible_by: use the rows as-is.
        if vocab_rows < cfg.language.vocab_size:
            raise ValueError(f"{vocab_rows} vocabulary rows cannot hold vocab_size {cfg.language.vocab_size}")
        cfg.language.make_vocab_size_divisible_by = vocab_rows
    if cfg.image_context_token_id is None:
        cfg.image_context_token_id = PLACEHOLDER_IMAGE_TOKEN_ID
    cfg.validate()
    cpu = Backends(cuda=False, transformer_engine=False, apex=False)  # same parameter names on any machine
    parts = build_part_configs(cfg, ParallelConfig(), PrecisionConfig(dtype=dtype), cpu)
    parts = PartConfigs(
        *(dataclasses.replace(c, perform_initialization=False) for c in (parts.vision, parts.projector, parts.language))
    )
    return SailVLModel(
        cfg, parts, build_specs(cpu.layer_backend, cfg, cfg.language.num_layers), pre_process=True, post_process=True
    ).eval()


def target_vocab_rows(cfg: ModelConfig, tp: int) -> int:
    """Rows of the embedding/output layer megatron uses at tensor-parallel size `tp`."""
    return cfg.language.padded_vocab_size(tp)


def tp1_sharded_state_dict(model: "SailVLModel") -> Dict[str, Any]:
    """The model's sharded state dict with each SwiGLU factory replaced by its whole tensor (TP1 only)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    assert parallel_state.get_tensor_model_parallel_world_size() == 1, "whole-tensor fc1 needs TP1"
    sd = model.sharded_state_dict()
    for name, entry in list(sd.items()):
        if not isinstance(entry, ShardedTensorFactory):
            continue
        parts = entry.build()
        first = parts[0]
        pre = first.prepend_axis_num
        offsets = [(ax, first.global_offset[ax], first.axis_fragmentations[ax]) for ax in range(pre)]
        whole = ShardedTensor.from_rank_offsets(
            first.key, entry.data, *offsets, replica_id=first.replica_id, prepend_axis_num=pre
        )
        if whole.global_shape != first.global_shape:
            raise RuntimeError(f"{name}: whole-tensor shape {whole.global_shape} != factory {first.global_shape}")
        sd[name] = whole
    return sd


class _WholeTensorView:
    """What `save_checkpoint` asks of a model chunk: its sharded state dict (here the TP1 whole-tensor one)."""

    def __init__(self, model: "SailVLModel"):
        self._model = model

    def sharded_state_dict(self) -> Dict[str, Any]:
        return tp1_sharded_state_dict(self._model)


def save_model(model: "SailVLModel", out_dir: Path, provenance: Dict[str, Any]) -> Path:
    """A training-compatible checkpoint folder (`latest` -> `iter_0000000`), weights only; the
    conversion record goes into the checkpoint's common state."""
    from sail_megatron.training.checkpoint import save_checkpoint

    return save_checkpoint(out_dir, 0, [_WholeTensorView(model)], common={PROVENANCE_KEY: provenance}, keep_last=1)


def load_model(model: "SailVLModel", ckpt: Path) -> Path:
    """Load a checkpoint written under any layout into the TP1/PP1 model, in place; returns the iter folder
    read. A run folder gives its newest checkpoint, also while its training prunes older ones
    (`read_checkpoint`); a damaged checkpoint raises CheckpointError naming the folder and the file."""
    from sail_megatron.training.backend_state import apply_model_state, load_sharded

    def read(directory: Path) -> Path:
        state = load_sharded({"model": tp1_sharded_state_dict(model)}, directory)
        apply_model_state(model, state["model"], directory)
        return directory

    return read_checkpoint(ckpt, read)


def read_common(ckpt: Path) -> Dict[str, Any]:
    """The common (non-tensor) state of a checkpoint folder or run folder; no process group needed."""
    from megatron.core import dist_checkpointing

    return read_checkpoint(ckpt, lambda directory: dist_checkpointing.load_common_state_dict(str(directory)))


def read_provenance(ckpt: Path) -> Optional[Dict[str, Any]]:
    """The conversion record of a checkpoint written by sail-convert, or None."""
    return (read_common(ckpt).get("common") or {}).get(PROVENANCE_KEY)


def checkpoint_root(ckpt: Path) -> Path:
    """The folder holding `latest` (and `hf_source/`) for a checkpoint or run folder path."""
    directory = resolve_checkpoint_folder(ckpt)
    return directory.parent if (directory.parent / "latest").is_file() else Path(ckpt)
