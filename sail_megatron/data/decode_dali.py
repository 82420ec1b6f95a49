"""NVIDIA DALI tile decoder: decode + bicubic resize on the device ('mixed': nvJPEG on the GPU;
'cpu' elsewhere), then tiles are cut and normalized in one pass on the same device (the
tile-normalization Triton kernel on CUDA, its reference on the CPU).

Images DALI would decode differently from the reference (alpha, palette, CMYK, 16-bit) go to the PIL
reference path, so both decoders give the same picture for every input.

The pipeline's batch size grows by powers of two, so a run builds it a few times at most. A batch DALI
fails on (corrupt pixel data behind a valid header) is decoded image by image by the reference instead,
and the pipeline is rebuilt for the next batch: DALI does not say a pipeline is usable after an error.
"""

import io
import logging
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from sail_megatron.config.data import DEFAULT_MAX_PIXELS
from sail_megatron.data.decode_pil import PilTileDecoder
from sail_megatron.data.tiling import TilePlan
from sail_megatron.kernels.tile_normalize import normalize_hwc, tiles_from_grid

logger = logging.getLogger(__name__)

_DALI_MODES = {"RGB", "L"}  # modes DALI and the reference decode alike
MIN_PIPELINE_BATCH = 8


def pipeline_capacity(num_images: int, current: int = 0) -> int:
    """Batch size of a pipeline that takes `num_images`: the next power of two (at least
    MIN_PIPELINE_BATCH), never below what is already built."""
    size = max(MIN_PIPELINE_BATCH, current)
    while size < num_images:
        size *= 2
    return size


def needs_reference_decode(data: bytes) -> bool:
    """From the header only: would DALI treat this image differently from the PIL reference?"""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.mode not in _DALI_MODES or "transparency" in img.info
    except Exception:
        return True  # let the reference path produce the precise error


def _dali_reason(error: Exception) -> str:
    """The line of a DALI error that names the failure (the rest is the pipeline's traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("Failed")), lines[-1] if lines else repr(error))


class DaliTileDecoder:
    """Callable like PilTileDecoder: (images, plans, tile_size) -> normalized tiles [N, 3, S, S]."""

    def __init__(
        self,
        device: torch.device,
        num_threads: int = 2,
        dtype: torch.dtype = torch.float32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.device = torch.device(device)
        self.dali_device = "mixed" if self.device.type == "cuda" else "cpu"
        self.num_threads = num_threads
        self.dtype = dtype
        self._pipe = None
        self._tile_size: Optional[int] = None
        self._capacity = 0  # kept across rebuilds, so a rebuilt pipeline does not grow again from the minimum
        self.pipelines_built = 0
        self._reference = PilTileDecoder(max_pixels)

    def _pipeline(self, num_images: int, tile_size: int):
        if self._pipe is not None and self._capacity >= num_images and self._tile_size == tile_size:
            return self._pipe
        self._release()
        self._capacity = pipeline_capacity(num_images, self._capacity if self._tile_size == tile_size else 0)
        self._tile_size = tile_size
        self._pipe = self._build(self._capacity, tile_size)
        self.pipelines_built += 1
        return self._pipe

    def _release(self) -> None:
        """Shut the pipeline down now: on the GPU it holds nvJPEG handles, streams and threads, which
        a dropped reference would keep until the garbage collector runs."""
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            return
        if self.dali_device == "mixed":
            torch.cuda.current_stream(self.device).synchronize()  # copies out of its buffers may be in flight
        shutdown = getattr(pipe, "_shutdown", None)  # what Pipeline.__del__ calls; not public API
        if shutdown is not None:
            shutdown()

    def _build(self, batch_size: int, tile_size: int):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(
            batch_size=batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index or 0 if self.dali_device == "mixed" else None,
            exec_dynamic=True,
            prefetch_queue_depth=1,
        )
        def tiles():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            width = fn.external_source(name="width", dtype=types.FLOAT, ndim=0)
            height = fn.external_source(name="height", dtype=types.FLOAT, ndim=0)
            image = fn.decoders.image(encoded, device=self.dali_device, output_type=types.RGB)
            grid = fn.resize(image, resize_x=width, resize_y=height, interp_type=types.INTERP_CUBIC, antialias=True)
            thumb = fn.resize(
                image, resize_x=tile_size, resize_y=tile_size, interp_type=types.INTERP_CUBIC, antialias=True
            )
            return grid, thumb

        pipe = tiles()
        pipe.build()
        return pipe

    def _to_torch(self, tensor_list, i: int) -> torch.Tensor:
        t = tensor_list[i]
        if self.dali_device == "mixed":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        return torch.from_numpy(np.array(t))

    def _run(self, images: List[bytes], plans: List[TilePlan], tile_size: int):
        """(grids, thumbs) from DALI, or None after a DALI error (the pipeline is then dropped)."""
        pipe = self._pipeline(len(images), tile_size)
        try:
            pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in images])
            pipe.feed_input("width", [np.float32(p.cols * tile_size) for p in plans])
            pipe.feed_input("height", [np.float32(p.rows * tile_size) for p in plans])
            return pipe.run()
        except RuntimeError as e:  # DALI raises every operator failure as a RuntimeError
            self._release()
            logger.warning(
                "DALI failed on a batch of %d images (%s); decoding it image by image with the "
                "reference and rebuilding the pipeline",
                len(images),
                _dali_reason(e),
            )
            return None

    def _decode_with_dali(self, images: List[bytes], plans: List[TilePlan], tile_size: int) -> List[torch.Tensor]:
        """Normalized tiles [num_tiles, 3, S, S] per image. After a DALI error the reference decodes
        each image, so the good ones still decode and a bad one raises its own ImageError (which the
        materializer counts, logs and masks)."""
        outputs = self._run(images, plans, tile_size)
        if outputs is None:
            return [self._decode_with_reference(b, p, tile_size) for b, p in zip(images, plans)]
        grids, thumbs = outputs
        out = []
        for i, plan in enumerate(plans):
            grid = self._to_torch(grids, i)  # [rows*S, cols*S, 3] uint8
            tiles = tiles_from_grid(grid, plan.rows, plan.cols, tile_size, dtype=self.dtype)
            if plan.thumbnail:
                tiles = torch.cat([tiles, normalize_hwc(self._to_torch(thumbs, i)[None], dtype=self.dtype)])
            out.append(tiles)
        return out

    def _decode_with_reference(self, image: bytes, plan: TilePlan, tile_size: int) -> torch.Tensor:
        return self._reference([image], [plan], tile_size).to(self.device, self.dtype)

    def __call__(self, images: List[bytes], plans: List[TilePlan], tile_size: int) -> torch.Tensor:
        if not images:
            return torch.empty(0, 3, tile_size, tile_size, dtype=self.dtype, device=self.device)
        special = [needs_reference_decode(b) for b in images]
        per_image: List[torch.Tensor] = [None] * len(images)
        fast = [i for i, s in enumerate(special) if not s]
        if fast:
            decoded = self._decode_with_dali([images[i] for i in fast], [plans[i] for i in fast], tile_size)
            for i, tiles in zip(fast, decoded):
                per_image[i] = tiles
        for i in (i for i, s in enumerate(special) if s):
            per_image[i] = self._decode_with_reference(images[i], plans[i], tile_size)
        return torch.cat(per_image)
