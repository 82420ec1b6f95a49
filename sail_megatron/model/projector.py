"""SAIL-VL projector (InternVL `mlp1`): LayerNorm -> Linear -> GELU -> Linear, all with biases."""

from typing import Optional

import torch
from megatron.core.dist_checkpointing.utils import apply_prefix_mapping
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from sail_megatron.model.fp8_shapes import pad_rows, token_multiple


class VisionProjector(MegatronModule):
    """Pixel-shuffled vision features [.., input_size] -> language embeddings [.., hidden].

    The MLP is megatron-core's MultimodalProjector; its input LayerNorm comes from the spec
    (IdentityOp where Transformer Engine folds it into fc1).
    """

    def __init__(
        self,
        config: TransformerConfig,
        norm_spec: ModuleSpec,
        mlp: MLPSubmodules,
        input_size: int,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        super().__init__(config=config)
        self.layer_norm = build_module(norm_spec, config=config, hidden_size=input_size, eps=config.layernorm_epsilon)
        self.mlp = MultimodalProjector(config, mlp, projector_type="mlp", input_size=input_size, tp_group=tp_group)
        self.token_multiple = token_multiple(config)
        """FP8 GEMM rule (fp8_shapes): 256 tokens per tile always meet it; smaller tiles get zero rows."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[..., input_size] -> [..., hidden]; every position is independent."""
        rows = features.reshape(-1, features.shape[-1])
        # megatron opens FP8 autocast only inside TransformerBlock; the projector is not in one.
        with get_fp8_context(self.config):
            out = self.mlp(self.layer_norm(pad_rows(rows, self.token_multiple)))
        return out[: rows.shape[0]].view(*features.shape[:-1], -1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """A separate LayerNorm is checkpointed under TE's fused fc1 names, so local and TE layouts
        read each other's checkpoints."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if any(True for _ in self.layer_norm.parameters()):
            apply_prefix_mapping(sd, {f"{prefix}layer_norm.": f"{prefix}mlp.encoder.linear_fc1.layer_norm_"})
        return sd
