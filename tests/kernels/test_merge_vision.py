"""merge_vision: Triton (interpreter on CPU, compiled on CUDA) against the PyTorch reference, forward and backward."""

import pytest
import torch

from sail_megatron.kernels.merge_vision import _MergeVision, merge_vision, merge_vision_reference

# Pure data movement: exact in every dtype. Casts (vision -> text dtype, grad -> vision dtype) round to
# nearest even in the kernel exactly as torch's .to() does, so mixed-dtype cases are exact too.
TOL = {
    torch.float32: dict(atol=0.0, rtol=0.0),
    torch.bfloat16: dict(atol=0.0, rtol=0.0),
    torch.float16: dict(atol=0.0, rtol=0.0),
}

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SHAPES = [  # (N, H, M): odd sizes around the blocks (512 columns, 4096 // block_h rows)
    (1, 1, 0),
    (1, 1, 1),
    (7, 1, 3),
    (50, 37, 13),
    (50, 37, 0),
    (33, 37, 33),
    (19, 600, 5),
    (5, 1536, 2),
]
DTYPES = [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32), (F32, BF16), (F16, BF16)]  # (text, vision)


def _inputs(n, h, m, text_dtype, vision_dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(n, h, generator=gen).to(text_dtype).to(device)
    vision = torch.randn(m, h, generator=gen).to(vision_dtype).to(device)
    positions = torch.randperm(n, generator=gen)[:m].sort().values.to(device)
    return text, vision, positions


def _assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOL[expected.dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-M{}".format(*s))
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}<-{str(d[1])[6:]}")
def test_forward_backward_match_reference(shape, dtypes, device):
    text, vision, positions = _inputs(*shape, *dtypes, device)
    text.requires_grad_(True)
    vision.requires_grad_(True)
    out = merge_vision(text, vision, positions, impl="triton")
    ref = merge_vision_reference(text, vision, positions)
    _assert_same(out, ref)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype).to(device)
    got = torch.autograd.grad(out, (text, vision), grad)
    want = torch.autograd.grad(ref, (text, vision), grad)
    for g, w in zip(got, want):
        _assert_same(g, w)


@pytest.mark.parametrize("which", ["text", "vision"])
def test_backward_for_one_input_only(which, device):
    text, vision, positions = _inputs(20, 37, 6, BF16, F32, device)
    leaf = text if which == "text" else vision
    leaf.requires_grad_(True)
    grad = torch.randn(20, 37).to(BF16).to(device)
    (got,) = torch.autograd.grad(merge_vision(text, vision, positions, impl="triton"), leaf, grad)
    (want,) = torch.autograd.grad(merge_vision_reference(text, vision, positions), leaf, grad)
    _assert_same(got, want)


def test_strided_rows(device):
    # Row views with padding (stride(0) > H), as a slice of a wider buffer would give.
    text, vision, positions = _inputs(17, 45, 4, F32, F32, device)
    text, vision = text[:, :37], vision[:, 3:40]
    _assert_same(merge_vision(text, vision, positions, impl="triton"), merge_vision_reference(text, vision, positions))


def test_auto_uses_reference_on_cpu():
    text, vision, positions = _inputs(10, 8, 3, F32, F32, "cpu")
    out = merge_vision(text, vision, positions)  # impl="auto"
    assert torch.equal(out, merge_vision_reference(text, vision, positions))
    assert torch.equal(out[positions], vision)
    assert torch.equal(merge_vision(text, vision, positions, impl="reference"), out)


@pytest.mark.parametrize(
    "args, match",
    [
        (((10,), (3, 4), (3,)), "2-D"),
        (((10, 4), (3, 5), (3,)), "hidden sizes differ"),
        (((10, 4), (3, 4), (2,)), "3 vision rows"),
        (((2, 4), (3, 4), (3,)), "do not fit"),
    ],
)
def test_shape_errors(args, match):
    text_shape, vision_shape, pos_shape = args
    positions = torch.arange(pos_shape[0])
    with pytest.raises(ValueError, match=match):
        merge_vision(torch.zeros(text_shape), torch.zeros(vision_shape), positions, impl="triton")


def test_value_and_dtype_errors():
    text, vision = torch.zeros(10, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="int64/int32"):
        merge_vision(text, vision, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="floating point"):
        merge_vision(text.long(), vision, torch.arange(3))
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        merge_vision(text, vision, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="unique and sorted"):
        merge_vision(text, vision, torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="one device"):
        merge_vision(text, vision, torch.arange(3, device="meta"))
    with pytest.raises(ValueError, match="impl must be one of"):
        merge_vision(text, vision, torch.arange(3), impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "h, m, dtypes", [(1536, 1024, (BF16, F32)), (3584, 2048, (BF16, BF16)), (3583, 777, (F32, F32))]
)
def test_compiled_matches_reference_at_real_sizes(h, m, dtypes):
    text, vision, positions = _inputs(8192, h, m, *dtypes, "cuda")
    text.requires_grad_(True)
    vision.requires_grad_(True)
    out = merge_vision(text, vision, positions)  # auto: compiled Triton on CUDA
    ref = merge_vision_reference(text, vision, positions)
    _assert_same(out, ref)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (text, vision), grad), torch.autograd.grad(ref, (text, vision), grad)):
        _assert_same(g, w)


@pytest.mark.parametrize("last_row_is_vision", [False, True], ids=["last-row-text", "last-row-vision"])
def test_minus_one_slots_are_dropped(last_row_is_vision, device):
    # packed_metadata pads its slot list with -1 when its num_image_tokens hint is too large. Device
    # positions are not range-checked (that would sync), so the kernels themselves must drop those slots:
    # a -1 must not wrap to the last row, and the vision rows it names get a zero gradient.
    n, h = 20, 37
    text, vision, _ = _inputs(n, h, 6, BF16, F32, device)
    valid = [2, 5, n - 1] if last_row_is_vision else [2, 5, 9]
    positions = torch.tensor(valid + [-1, -1, -1], device=device)
    text.requires_grad_(True)
    vision.requires_grad_(True)
    out = _MergeVision.apply(text, vision, positions)  # the Triton path, past the host-only value checks
    ref = merge_vision_reference(text, vision[:3], positions[:3])
    _assert_same(out, ref)
    grad = torch.randn(n, h, generator=torch.Generator().manual_seed(1)).to(BF16).to(device)
    grad_text, grad_vision = torch.autograd.grad(out, (text, vision), grad)
    want_text, want_vision = torch.autograd.grad(ref, (text, vision), grad)
    _assert_same(grad_text, want_text)
    _assert_same(grad_vision, want_vision)  # zero for the dropped rows 3..5
    assert not grad_vision[3:].any()
