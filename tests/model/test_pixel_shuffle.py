"""The model's pixel shuffle (the kernel, or its PyTorch reference off CUDA) against the conversion
reference's transcription of InternVL's layout: the two implementations the project keeps, held equal."""

import pytest
import torch

from sail_megatron.convert.hf_reference import pixel_shuffle as internvl_pixel_shuffle
from sail_megatron.kernels.pixel_shuffle import pixel_shuffle


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
@pytest.mark.parametrize("n,g,c,k", [(1, 4, 3, 2), (3, 8, 5, 2), (2, 6, 4, 3)])
def test_matches_reference(ps_version, n, g, c, k):
    x = torch.randn(n, g * g, c)
    expected = internvl_pixel_shuffle(x, 1 / k, ps_version)
    torch.testing.assert_close(pixel_shuffle(x, 1 / k, ps_version), expected, rtol=0, atol=0)


def test_internvl_shape():
    x = torch.randn(2, 1024, 1024)
    assert pixel_shuffle(x, 0.5, "v2").shape == (2, 256, 4096)


def test_rejects_non_square_grid():
    with pytest.raises(ValueError, match="square"):
        pixel_shuffle(torch.randn(1, 12, 4), 0.5, "v2")
