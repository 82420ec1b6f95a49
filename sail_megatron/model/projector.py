"""SAIL-VL projector (InternVL `mlp1`): LayerNorm -> Linear -> GELU -> Linear, all with biases."""

import torch
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig


class VisionProjector(MegatronModule):
    """Pixel-shuffled vision features [.., input_size] -> language embeddings [.., hidden].

    The MLP is megatron-core's MultimodalProjector; its input LayerNorm comes from the spec
    (IdentityOp where Transformer Engine folds it into fc1).
    """

    def __init__(self, config: TransformerConfig, norm_spec: ModuleSpec, mlp: MLPSubmodules, input_size: int):
        super().__init__(config=config)
        self.layer_norm = build_module(norm_spec, config=config, hidden_size=input_size, eps=config.layernorm_epsilon)
        self.mlp = MultimodalProjector(config, mlp, projector_type="mlp", input_size=input_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.layer_norm(features))
