"""pixel_shuffle: Triton (interpreter on CPU, compiled on CUDA) against InternVL's reference, forward and backward."""

import pytest
import torch

from sail_megatron.kernels.pixel_shuffle import pixel_shuffle, pixel_shuffle_reference

# A permutation moves bits, it computes nothing: exact in every dtype, gradients included.
TOL = {
    torch.float32: dict(atol=0.0, rtol=0.0),
    torch.bfloat16: dict(atol=0.0, rtol=0.0),
    torch.float16: dict(atol=0.0, rtol=0.0),
}


def _internvl_pixel_shuffle(x, downsample_ratio, ps_version):
    """The InternVL function verbatim, as the oracle that the kernel's reference must equal bit for bit."""
    n, num_patches, c = x.shape
    g = int(round(num_patches**0.5))
    r = downsample_ratio
    x = x.reshape(n, g, g, c)
    x = x.view(n, g, int(g * r), int(c / r))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(g * r), int(g * r), int(c / (r * r)))
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, x.shape[-1])


CASES = [  # (n, g, c, ratio)
    (1, 2, 12, 0.5),
    (3, 4, 20, 0.5),
    (2, 6, 12, 0.5),
    (1, 6, 20, 0.5),
    (2, 4, 1, 0.5),
    (2, 6, 12, 1 / 3),
    (1, 8, 4, 0.25),
    (2, 3, 5, 1.0),
]


def _x(n, g, c, dtype, device, extra_tokens=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, g * g + extra_tokens, c, generator=gen).to(dtype).to(device)


def _assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOL[expected.dtype])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}-g{}-c{}-r{:.3f}".format(*c))
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_backward_match_reference(case, version, dtype, device):
    n, g, c, r = case
    x = _x(n, g, c, dtype, device).requires_grad_(True)
    out = pixel_shuffle(x, r, version, impl="triton")
    ref = pixel_shuffle_reference(x, r, version)
    _assert_same(ref, _internvl_pixel_shuffle(x, r, version))
    _assert_same(out, ref)
    assert out.shape == (n, (g * g) // round(1 / r) ** 2, c * round(1 / r) ** 2)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(ref, x, grad)
    _assert_same(got, want)


def test_strided_input_and_grad(device):
    # InternVL drops the CLS token first (x[:, 1:]): a non-contiguous view the kernel reads by stride.
    full = _x(2, 4, 12, torch.float32, device, extra_tokens=1).requires_grad_(True)
    x = full[:, 1:, :]
    out = pixel_shuffle(x, 0.5, "v2", impl="triton")
    ref = pixel_shuffle_reference(x, 0.5, "v2")
    _assert_same(out, ref)
    grad = torch.randn(out.shape[2], out.shape[1], out.shape[0]).to(device).permute(2, 1, 0)  # strided grad too
    _assert_same(torch.autograd.grad(out, full, grad)[0], torch.autograd.grad(ref, full, grad)[0])


def test_empty_batch(device):
    # (InternVL's own code cannot reshape 0 tiles with -1; the kernel path just returns the empty result.)
    x = torch.zeros(0, 16, 8, device=device)
    assert pixel_shuffle(x, impl="triton").shape == (0, 4, 32)


@pytest.mark.parametrize(
    "shape, ratio, version, match",
    [
        ((4, 12), 0.5, "v2", "tiles, patches, channels"),
        ((1, 10, 4), 0.5, "v2", "square patch grid"),
        ((1, 16, 4), 0.3, "v2", "1/k for an integer k"),
        ((1, 16, 4), 0.0, "v2", "1/k for an integer k"),
        ((1, 16, 4), 2.0, "v2", "1/k for an integer k"),
        ((1, 36, 4), 0.25, "v2", "does not split into 4x4"),
        ((1, 16, 4), 0.5, "v3", "ps_version"),
    ],
)
def test_errors(shape, ratio, version, match):
    with pytest.raises(ValueError, match=match):
        pixel_shuffle(torch.zeros(shape), ratio, version, impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_compiled_matches_reference_at_real_sizes(version, dtype):
    full = _x(24, 32, 1024, dtype, "cuda", extra_tokens=1).requires_grad_(True)
    x = full[:, 1:, :]
    out = pixel_shuffle(x, 0.5, version)  # auto: compiled Triton on CUDA
    ref = pixel_shuffle_reference(x, 0.5, version)
    _assert_same(out, ref)
    grad = torch.randn_like(out)
    _assert_same(torch.autograd.grad(out, full, grad)[0], torch.autograd.grad(ref, full, grad)[0])
