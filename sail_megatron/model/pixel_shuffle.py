"""InternVL's pixel shuffle: merges k x k neighbouring patches into one token of k*k*C channels."""

import torch


def pixel_shuffle(x: torch.Tensor, downsample_ratio: float, ps_version: str) -> torch.Tensor:
    """[tiles, g*g, C] patch features -> [tiles, (g*r)^2, C/r^2] with r = downsample_ratio.

    Reproduces InternVL exactly: the grid is read as [n, w, h, c], h is folded into channels,
    then w; 'v1' leaves the result transposed (how early checkpoints were trained), 'v2' undoes it.
    """
    n, num_patches, c = x.shape
    g = int(round(num_patches ** 0.5))
    if g * g != num_patches:
        raise ValueError(f"pixel_shuffle needs a square patch grid, got {num_patches} patches")
    r = downsample_ratio
    x = x.reshape(n, g, g, c)
    x = x.view(n, g, int(g * r), int(c / r))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(g * r), int(g * r), int(c / (r * r)))
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, x.shape[-1])
