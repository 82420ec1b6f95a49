"""NVIDIA DALI tile decoder: decode + bicubic resize on the device ('mixed': nvJPEG on the GPU;
'cpu' elsewhere), then tiles are cut and normalized in one pass on the same device (the
tile-normalization Triton kernel on CUDA, its reference on the CPU).

Images DALI would decode differently from the reference (alpha, palette, CMYK, 16-bit) go to the PIL
reference path, so both decoders give the same picture for every input.
"""

import io
from typing import List

import numpy as np
import torch
from PIL import Image

from sail_megatron.data.decode_pil import PilTileDecoder
from sail_megatron.data.tiling import TilePlan
from sail_megatron.kernels.tile_normalize import normalize_hwc, tiles_from_grid

_DALI_MODES = {"RGB", "L"}  # modes DALI and the reference decode alike


def needs_reference_decode(data: bytes) -> bool:
    """From the header only: would DALI treat this image differently from the PIL reference?"""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.mode not in _DALI_MODES or "transparency" in img.info
    except Exception:
        return True  # let the reference path produce the precise error


class DaliTileDecoder:
    """Callable like PilTileDecoder: (images, plans, tile_size) -> normalized tiles [N, 3, S, S]."""

    def __init__(self, device: torch.device, num_threads: int = 2, dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dali_device = "mixed" if self.device.type == "cuda" else "cpu"
        self.num_threads = num_threads
        self.dtype = dtype
        self._pipe = None
        self._pipe_key = None
        self._reference = PilTileDecoder()

    def _pipeline(self, batch_size: int, tile_size: int):
        key = (batch_size, tile_size)
        if self._pipe is not None and self._pipe_key[0] >= batch_size and self._pipe_key[1] == tile_size:
            return self._pipe
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=batch_size, num_threads=self.num_threads,
                      device_id=self.device.index or 0 if self.dali_device == "mixed" else None,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def tiles():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            width = fn.external_source(name="width", dtype=types.FLOAT, ndim=0)
            height = fn.external_source(name="height", dtype=types.FLOAT, ndim=0)
            image = fn.decoders.image(encoded, device=self.dali_device, output_type=types.RGB)
            grid = fn.resize(image, resize_x=width, resize_y=height, interp_type=types.INTERP_CUBIC, antialias=True)
            thumb = fn.resize(image, resize_x=tile_size, resize_y=tile_size, interp_type=types.INTERP_CUBIC,
                              antialias=True)
            return grid, thumb

        self._pipe = tiles()
        self._pipe.build()
        self._pipe_key = key
        return self._pipe

    def _to_torch(self, tensor_list, i: int) -> torch.Tensor:
        t = tensor_list[i]
        if self.dali_device == "mixed":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        return torch.from_numpy(np.array(t))

    def _decode_with_dali(self, images: List[bytes], plans: List[TilePlan], tile_size: int) -> List[torch.Tensor]:
        """Normalized tiles [num_tiles, 3, S, S] per image."""
        pipe = self._pipeline(len(images), tile_size)
        pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in images])
        pipe.feed_input("width", [np.float32(p.cols * tile_size) for p in plans])
        pipe.feed_input("height", [np.float32(p.rows * tile_size) for p in plans])
        grids, thumbs = pipe.run()
        out = []
        for i, plan in enumerate(plans):
            grid = self._to_torch(grids, i)  # [rows*S, cols*S, 3] uint8
            tiles = tiles_from_grid(grid, plan.rows, plan.cols, tile_size, dtype=self.dtype)
            if plan.thumbnail:
                tiles = torch.cat([tiles, normalize_hwc(self._to_torch(thumbs, i)[None], dtype=self.dtype)])
            out.append(tiles)
        return out

    def __call__(self, images: List[bytes], plans: List[TilePlan], tile_size: int) -> torch.Tensor:
        if not images:
            return torch.empty(0, 3, tile_size, tile_size, dtype=self.dtype, device=self.device)
        special = [needs_reference_decode(b) for b in images]
        per_image: List[torch.Tensor] = [None] * len(images)
        fast = [i for i, s in enumerate(special) if not s]
        if fast:
            for i, tiles in zip(fast, self._decode_with_dali([images[i] for i in fast], [plans[i] for i in fast],
                                                            tile_size)):
                per_image[i] = tiles
        for i in (i for i, s in enumerate(special) if s):
            per_image[i] = self._reference([images[i]], [plans[i]], tile_size).to(self.device, self.dtype)
        return torch.cat(per_image)
