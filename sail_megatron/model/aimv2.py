"""AIMv2 vision encoder (also SAILViT, its continued training) on megatron-core transformer layers.

x = norm(patch_conv(tiles)) + positions;  pre-norm layers with RMSNorm, bias-free attention and a
bias-free SwiGLU MLP `fc2(silu(fc1 x) * fc3 x)`;  a final RMSNorm when the features are the encoder's
own output (`select_layer` -1). No CLS token: every patch feature goes to pixel shuffle.
The layers are megatron-core's TransformerLayer as the spec names them; the norms come from the spec.
"""

from typing import Optional

import torch
from megatron.core.models.common.vision_module.vision_module import VisionModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from sail_megatron.config import VisionConfig
from sail_megatron.model.fp8_shapes import token_multiple
from sail_megatron.model.tile_layout import TileLayout


class AIMv2Model(VisionModule):
    """Input [tiles, 3, S, S]; output the `select_layer` hidden state [tiles, num_patches, hidden]."""

    def __init__(
        self,
        config: TransformerConfig,
        vision: VisionConfig,
        layer_spec: ModuleSpec,
        norm_spec: ModuleSpec,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.vision = vision
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        factory = dict(dtype=config.params_dtype, device=device)
        hidden = vision.hidden_size
        self.patch_embedding = torch.nn.Conv2d(
            3, hidden, kernel_size=vision.patch_size, stride=vision.patch_size, bias=True, **factory
        )
        self.patch_norm = build_module(norm_spec, config=config, hidden_size=hidden, eps=config.layernorm_epsilon)
        self.position_embedding = torch.nn.Parameter(torch.empty(1, vision.num_positions, hidden, **factory))
        if config.perform_initialization:
            config.init_method(self.position_embedding)
        # All built layers live on this stage: the vision config says pipeline size 1.
        self.decoder = TransformerBlock(
            config=config, spec=layer_spec, pre_process=True, post_process=False, pg_collection=pg_collection
        )
        self.final_layernorm = (
            build_module(norm_spec, config=config, hidden_size=hidden, eps=config.layernorm_epsilon)
            if vision.applies_final_norm
            else None
        )
        self.layout = TileLayout(vision.num_positions, token_multiple(config))

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tiles = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [T, H, g, g]
        x = self.patch_norm(x.flatten(2).transpose(1, 2)) + self.position_embedding  # [T, g*g, H]
        x, packed = self.layout.enter(x)
        x = self.decoder(hidden_states=x, attention_mask=None, packed_seq_params=packed)
        if self.final_layernorm is not None:
            x = self.final_layernorm(x)
        return self.layout.leave(x, tiles).contiguous()  # [T, g*g, H]
