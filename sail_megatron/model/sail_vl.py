"""The SAIL-VL model: vision encoder -> pixel shuffle -> projector -> merged into the Qwen decoder's embeddings.

One pipeline stage's piece of it: the first stage holds the vision encoder, the projector and the
token embedding; the last holds the output layer; layers split evenly in between.
"""

import functools
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from sail_megatron.config import ModelConfig
from sail_megatron.config.model import padded_vocab_size  # noqa: F401  (re-exported: its home is the config)
from sail_megatron.data.vision_share import VisionShare
from sail_megatron.kernels.merge_vision import merge_vision
from sail_megatron.kernels.packed_metadata import packed_metadata
from sail_megatron.kernels.pixel_shuffle import pixel_shuffle
from sail_megatron.model.projector import VisionProjector
from sail_megatron.model.specs import ModelSpecs
from sail_megatron.model.transformer_configs import PartConfigs
from sail_megatron.model.vision_buckets import DynamicTiles
from sail_megatron.model.vision_layout import TensorParallelVision


@functools.lru_cache(maxsize=16)
def _whole_row_bounds(length: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens [0, length] treating the flattened batch as one row. Cached: building it anew would
    copy from pageable host memory, which blocks the host until the device is idle."""
    return torch.tensor([0, length], dtype=torch.int32, device=device)


def merge_vision_embeddings(
    text: torch.Tensor, vision: torch.Tensor, input_ids: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Write vision tokens into the `<IMG_CONTEXT>` slots of the text embeddings.

    text [s, b, h]; vision [n, h] in (sample, position) order; input_ids [b, s] with n image tokens.
    Triton kernels on CUDA (slot map without a host sync, one-pass scatter), their references on the CPU.
    The data path checks that tiles and image tokens agree before a batch reaches the device.
    """
    b, s = input_ids.shape
    flat = text.transpose(0, 1).reshape(b * s, -1)  # (b, s)-major: ascending slots follow the vision order
    whole = _whole_row_bounds(b * s, input_ids.device)
    # On CUDA the slot count is given (no host sync; the loader guarantees it); on the CPU it is counted,
    # so a mismatch raises in merge_vision instead of being cut short.
    known = vision.shape[0] if input_ids.is_cuda else None
    _, slots = packed_metadata(input_ids.reshape(-1), whole, image_token_id, num_image_tokens=known)
    if slots.shape[0] != vision.shape[0]:
        raise ValueError(
            f"the batch has {slots.shape[0]} <IMG_CONTEXT> tokens but the images give "
            f"{vision.shape[0]} vision tokens: tile count and token expansion disagree"
        )
    merged = merge_vision(flat, vision, slots)
    return merged.view(b, s, -1).transpose(0, 1).contiguous()


class SailVLModel(MegatronModule):
    """One pipeline stage of a SAIL-VL model."""

    def __init__(
        self,
        model: ModelConfig,
        configs: PartConfigs,
        specs: ModelSpecs,
        pre_process: bool = True,
        post_process: bool = True,
        vision_layout=None,
        tile_runner: Optional[DynamicTiles] = None,
    ):
        """vision_layout: where the vision side runs over the tensor-parallel ranks (model/vision_layout.py);
        None: split like the language model. tile_runner: how the ViT is called on a micro-batch's tiles
        (model/vision_buckets.py: static tile buckets, CUDA graphs); None: at their own count."""
        super().__init__(config=configs.language)
        self.model_config = model
        self.model_type = ModelType.encoder_or_decoder  # read by the pipeline schedules
        self.pre_process = pre_process
        self.post_process = post_process
        self.sequence_parallel = configs.language.sequence_parallel
        self.vision_layout = vision_layout or TensorParallelVision()
        self.tile_runner = tile_runner or DynamicTiles()
        if pre_process:
            groups = self.vision_layout.groups()
            self.vision_model = build_module(
                specs.vision_encoder, config=configs.vision, vision=model.vision, pg_collection=groups
            )
            shuffled_width = model.vision.hidden_size * model.projector.merge_factor**2
            self.projector = VisionProjector(
                configs.projector,
                specs.projector_norm,
                specs.projector_mlp,
                shuffled_width,
                tp_group=groups.tp if groups is not None else None,
            )
            self.vision_layout.prepare(self.vision_model, self.projector)
        lang = model.language
        self.language_model = GPTModel(
            config=configs.language,
            transformer_layer_spec=specs.language_block,
            vocab_size=lang.padded_vocab_size(configs.language.tensor_model_parallel_size),
            max_sequence_length=lang.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=lang.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(lang.rope_theta),
            # Vision tokens are merged first; we scatter to sequence-parallel ranks after that.
            scatter_embedding_sequence_parallel=False,
        )
        # Pipeline schedules read these from the model they drive.
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        self.vision_layout.mark_replicas(sd, (f"{prefix}vision_model.", f"{prefix}projector."))
        return sd

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        """The tied embedding/output weight of this stage: megatron sums its gradient over the first and
        last pipeline stages (finalize_model_grads) when the embeddings are tied (Qwen3-1.7B)."""
        return self.language_model.shared_embedding_or_output_weight()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [T, 3, S, S] -> language-space vision tokens [T * tokens_per_tile, hidden]. The tile
        runner pads the ViT's call to a tile bucket (if set) and returns the T tiles' features."""
        features = self.tile_runner(self.vision_model, pixel_values)
        shuffled = pixel_shuffle(
            features, self.model_config.projector.downsample_ratio, self.model_config.projector.ps_version
        )
        return self.projector(shuffled).flatten(0, 1)

    def _blank_vision_term(self) -> torch.Tensor:
        """A zero that depends on every vision parameter: the ViT and projector run on one blank tile.

        A micro-batch without images must still run the vision side: with overlapped gradient
        reduction, DDP reduces a bucket only once every parameter in it has received a gradient, and
        FP8 reduces amax statistics across ranks at the end of every FP8 region. (Megatron's LLaVA runs
        text-only samples through the encoder for the same reasons.)"""
        size = self.model_config.vision.image_size
        weight = self.vision_model.patch_embedding.weight
        blank = torch.zeros(1, 3, size, size, dtype=weight.dtype, device=weight.device)
        # Zeroed before the sum: in fp16 a sum of ~400K projector outputs can exceed 65504, and inf * 0 is NaN.
        return (self.encode_images(blank) * 0.0).sum()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        vision_share: Optional[VisionShare] = None,
    ):
        """Returns per-token losses [b, s] on the last stage when `labels` is given, logits otherwise,
        and the hidden states for the next stage elsewhere."""
        decoder_input = None
        if self.pre_process:
            # Vision first: parameters are registered (and, with overlap_param_gather, all-gathered) in
            # that order, vision encoder before the token embedding.
            # vision_share: this rank encodes its share of the images and receives the others' tokens.
            own = pixel_values is not None and pixel_values.shape[0] > 0
            vision = self.encode_images(pixel_values) if own else None
            blank = None if own else self._blank_vision_term()
            if vision_share is not None:
                local = vision if own else blank.new_zeros(0, self.config.hidden_size).to(blank.dtype)
                vision = self.vision_layout.exchange(local, vision_share)
            embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
            if vision is not None:
                embeddings = merge_vision_embeddings(
                    embeddings, vision, input_ids, self.model_config.image_context_token_id
                )
            if blank is not None:
                embeddings = embeddings + blank.to(embeddings.dtype)
            if self.sequence_parallel:
                embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
            decoder_input = embeddings
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
        )
