"""Pixel shuffle against an independent formulation of InternVL's layout."""

import pytest
import torch

from sail_megatron.kernels.pixel_shuffle import pixel_shuffle


def reference(x: torch.Tensor, k: int, ps_version: str) -> torch.Tensor:
    """Token (i, j) of the k-times coarser grid holds the k*k patches (k*i + a, k*j + b).

    Worked out from InternVL's view/permute sequence: channels are ordered (row offset a, column
    offset b, c); v2 orders the output tokens row-major over (i, j); v1 leaves them transposed, (j, i).
    """
    n, num, c = x.shape
    g = int(num**0.5)
    grid = x.reshape(n, g, g, c)
    out = torch.empty(n, g // k, g // k, k * k * c)
    for i in range(g // k):
        for j in range(g // k):
            parts = [grid[:, k * i + a, k * j + b] for a in range(k) for b in range(k)]
            out[:, i, j] = torch.cat(parts, dim=-1)
    if ps_version == "v1":
        out = out.transpose(1, 2)
    return out.reshape(n, -1, k * k * c)


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
@pytest.mark.parametrize("n,g,c,k", [(1, 4, 3, 2), (3, 8, 5, 2), (2, 6, 4, 3)])
def test_matches_reference(ps_version, n, g, c, k):
    x = torch.randn(n, g * g, c)
    torch.testing.assert_close(pixel_shuffle(x, 1 / k, ps_version), reference(x, k, ps_version), rtol=0, atol=0)


def test_internvl_shape():
    x = torch.randn(2, 1024, 1024)
    assert pixel_shuffle(x, 0.5, "v2").shape == (2, 256, 4096)


def test_rejects_non_square_grid():
    with pytest.raises(ValueError, match="square"):
        pixel_shuffle(torch.randn(1, 12, 4), 0.5, "v2")
