"""InternViT vision encoder on megatron-core transformer layers.

Own module rather than megatron-core's CLIPViTModel, which lacks layer scale, drop path and
select_layer truncation, and whose local ViT spec uses a causal mask.
"""

import dataclasses
from typing import Optional

import torch
from megatron.core.models.common.vision_module.vision_module import VisionModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from sail_megatron.config import VisionConfig
from sail_megatron.model.fp8_shapes import token_multiple
from sail_megatron.model.tile_layout import TileLayout


class InternViTModel(VisionModule):
    """Patch embedding + CLS token + learned positions, then `num_built_layers` pre-norm layers.

    Parameter names follow the InternVL checkpoint where they are ours (class_embedding,
    patch_embedding, position_embedding); the transformer layers are megatron-core's.
    Input [tiles, 3, S, S]; output the `select_layer` hidden state without the CLS token,
    [tiles, num_patches, hidden].
    """

    def __init__(
        self,
        config: TransformerConfig,
        vision: VisionConfig,
        layer_spec: ModuleSpec,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        """pg_collection: the process groups its layers use (model/vision_layout.py); None: megatron's."""
        super().__init__(config=config)
        self.vision = vision
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        factory = dict(dtype=config.params_dtype, device=device)
        hidden = vision.hidden_size
        self.patch_embedding = torch.nn.Conv2d(
            3, hidden, kernel_size=vision.patch_size, stride=vision.patch_size, bias=True, **factory
        )
        self.class_embedding = torch.nn.Parameter(torch.empty(1, 1, hidden, **factory))
        self.position_embedding = torch.nn.Parameter(torch.empty(1, vision.num_positions, hidden, **factory))
        if config.perform_initialization:
            config.init_method(self.class_embedding)
            config.init_method(self.position_embedding)
        layer_spec = dataclasses.replace(
            layer_spec,
            params={
                **layer_spec.params,
                "drop_path_rate": vision.drop_path_rate,
                "drop_path_depth": vision.num_layers,
                "layer_scale_init": vision.layer_scale_init,
                "tile_tokens": vision.num_positions,
            },
        )
        # All built layers live on this stage: the vision config says pipeline size 1.
        self.decoder = TransformerBlock(
            config=config, spec=layer_spec, pre_process=True, post_process=False, pg_collection=pg_collection
        )
        self.layout = TileLayout(vision.num_positions, token_multiple(config))

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tiles = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [T, H, g, g]
        x = x.flatten(2).transpose(1, 2)  # [T, g*g, H]
        cls = self.class_embedding.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding  # [T, 1+g*g, H]
        x, packed = self.layout.enter(x)
        x = self.decoder(hidden_states=x, attention_mask=None, packed_seq_params=packed)
        return self.layout.leave(x, tiles)[:, 1:].contiguous()  # drop CLS -> [T, g*g, H]
