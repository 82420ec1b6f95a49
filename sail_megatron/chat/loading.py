"""The model of a ChatSource on one process (TP1/PP1), with its weights, ready for inference.

megatron-core needs a process group even for one process: on the CPU the converter's (`single_process`:
gloo, CUDA hidden, the CPU layer), on a GPU the trainer's `init_distributed` as one rank. The model is
built as the converter builds it (megatron-core's local layers, no random init) in the compute dtype and
filled from the source: a megatron checkpoint written under any TP/PP through dist_checkpointing
(`convert.mcore_io.load_model`), a Hugging Face folder through the converter's name mapping
(`convert.to_mcore.fill_params`), in memory: nothing is written.
"""

import dataclasses
import logging
import os
import socket
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from sail_megatron.chat.errors import ChatError
from sail_megatron.chat.source import ChatSource
from sail_megatron.config import ParallelConfig
from sail_megatron.convert import mapping
from sail_megatron.convert.checks import DTYPE_OPTIONS
from sail_megatron.convert.hf_io import SafetensorsFolder
from sail_megatron.convert.mcore_io import build_empty_model, load_model, single_process
from sail_megatron.convert.to_mcore import check_all_filled, fill_params

if TYPE_CHECKING:
    from sail_megatron.model.sail_vl import SailVLModel

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def one_process(device: torch.device) -> Iterator[None]:
    """torch.distributed and megatron-core's parallel state for this one process (TP1/PP1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ChatError(
            f"sail-chat runs as one process, WORLD_SIZE is {os.environ['WORLD_SIZE']}: run it without torchrun"
        )
    if device.type == "cpu":
        with single_process():
            yield
        return
    from sail_megatron.platform import destroy_distributed, init_distributed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    init_distributed(ParallelConfig())
    try:
        yield
    finally:
        destroy_distributed()


def load_chat_model(source: ChatSource, image_token_id: int, device: torch.device, dtype: str) -> "SailVLModel":
    """The source's model in `dtype` ('fp32', 'bf16', 'fp16') on `device`, in eval mode. Call inside
    `one_process`."""
    cfg = dataclasses.replace(source.model, image_context_token_id=image_token_id)
    model = build_empty_model(cfg, dtype, source.vocab_rows)
    weights = source.weights
    if source.kind == "hf":
        with SafetensorsFolder(weights) as folder:  # its tensors were checked by resolve_source
            rules = mapping.tensor_rules(cfg, source.lm_head_stored)
            check_all_filled(model, fill_params(model, folder, rules, cfg))
    else:  # any saved TP/PP; stored values cast into the model's dtype; a run folder's newest checkpoint
        weights = load_model(model, source.ckpt or weights)
    logger.info("loaded %s (%s, stored %s) as %s on %s", weights, source.kind, source.stored_dtype, dtype, device)
    return model.to(device=device, dtype=DTYPE_OPTIONS[dtype]).eval()
