"""InternViT's transformer layer: megatron-core's layer plus layer scale and drop path.

h = h + drop_path(attn(norm1(h)) * ls1);  h = h + drop_path(mlp(norm2(h)) * ls2)
megatron-core's TransformerLayer has neither, so the two residual adds (its "bias-dropout-add"
hooks) are replaced; everything else (attention, MLP, TP layers, specs) is megatron-core's.
"""

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


def drop_path(x: torch.Tensor, rate: float, training: bool, tile_tokens: int) -> torch.Tensor:
    """Stochastic depth: drops whole tiles of the branch. Batched, [s, b, h] with s = tile_tokens, a tile
    is a column b; packed (model/tile_layout.py), [T*s + pad, 1, h], tile k is rows k*s..(k+1)*s and the
    pad rows come last (kept). The same draws either way: one per tile, in tile order."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    if x.shape[0] == tile_tokens:
        mask = torch.empty((1, x.shape[1], 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    else:
        tiles = x.shape[0] // tile_tokens
        drawn = torch.empty(tiles, dtype=x.dtype, device=x.device).bernoulli_(keep)
        pad = drawn.new_full((x.shape[0] - tiles * tile_tokens,), keep)  # * 1 after the / keep below
        mask = torch.cat([drawn.repeat_interleave(tile_tokens), pad]).view(-1, 1, 1)
    return x * mask / keep


class LayerScaleTransformerLayer(TransformerLayer):
    """Pre-norm ViT layer with per-channel layer scale (ls1, ls2) and per-tile drop path.

    Stochastic depth rises linearly from 0 at the first layer to `drop_path_rate` at the last layer of
    the released encoder (`drop_path_depth` layers, built or not), as in InternViT.
    """

    def __init__(
        self,
        *args,
        drop_path_rate: float = 0.0,
        drop_path_depth: int = 1,
        layer_scale_init: float = 0.1,
        tile_tokens: int = 1,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.tile_tokens = tile_tokens
        device = "cpu" if self.config.use_cpu_initialization else torch.cuda.current_device()
        hidden = self.config.hidden_size
        self.ls1 = torch.nn.Parameter(
            torch.full((hidden,), layer_scale_init, dtype=self.config.params_dtype, device=device)
        )
        self.ls2 = torch.nn.Parameter(
            torch.full((hidden,), layer_scale_init, dtype=self.config.params_dtype, device=device)
        )
        self.drop_path_rate = drop_path_rate * (self.layer_number - 1) / max(drop_path_depth - 1, 1)
        self.self_attn_bda = self._scaled_residual_add("ls1")
        self.mlp_bda = self._scaled_residual_add("ls2")

    def _scaled_residual_add(self, scale_name: str):
        """A bias-dropout-add factory with megatron-core's calling convention: f(training, fused)(x, res, p)."""

        def factory(training: bool, fused: bool):
            def apply(x_with_bias, residual, dropout_prob):
                x, bias = x_with_bias
                if bias is not None:
                    x = x + bias
                x = torch.nn.functional.dropout(x, p=dropout_prob, training=training)
                x = x * getattr(self, scale_name)
                return residual + drop_path(x, self.drop_path_rate, training, self.tile_tokens)

            return apply

        return factory
