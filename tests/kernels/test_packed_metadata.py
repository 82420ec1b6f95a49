"""packed_metadata: Triton (interpreter on CPU, compiled on CUDA) against the PyTorch reference."""

import pytest
import torch

from sail_megatron.kernels.packed_metadata import packed_metadata, packed_metadata_reference

# Integer outputs (int64 position ids and indices): exact.
TOL = {torch.int64: dict(atol=0, rtol=0)}

IMG = 7  # the <IMG_CONTEXT> id in these tests


def _batch(n, lengths_or_b, image_fraction, device, token_dtype=torch.int64, cu_dtype=torch.int32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(lengths_or_b, int):  # B random cuts (repeats allowed: empty samples)
        cuts = torch.randint(0, n + 1, (lengths_or_b - 1,), generator=gen).sort().values
    else:
        cuts = torch.tensor(lengths_or_b, dtype=torch.int64).cumsum(0)[:-1]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([n])]).to(cu_dtype)
    text = torch.randint(8, 1000, (n,), generator=gen)
    tokens = torch.where(torch.rand(n, generator=gen) < image_fraction, IMG, text).to(token_dtype)
    return tokens.to(device), cu.to(device)


def _assert_same(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.int64 and g.shape == w.shape
        torch.testing.assert_close(g, w, **TOL[torch.int64])


CASES = [  # (N, B or sample lengths, image fraction); 1024 is the block, so 1025/2500 cross blocks
    (1, 1, 0.0),
    (1, 1, 1.0),
    (37, 3, 0.3),
    (1025, 4, 0.5),
    (2500, 9, 0.4),
    (300, 1, 1.0),  # M == N
    (300, 5, 0.0),  # M == 0
    (64, 64, 0.5),  # random cuts with many empty samples
    (6, [1] * 6, 0.5),  # every sample one token long
    (10, [0, 4, 0, 0, 6, 0], 0.5),  # empty samples at the ends and in between
]


def _case_id(case) -> str:
    n, b, p = case
    return f"N{n}-B{b if isinstance(b, int) else len(b)}-p{p}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, device):
    tokens, cu = _batch(*case, device)
    want = packed_metadata_reference(tokens, cu, IMG)
    _assert_same(packed_metadata(tokens, cu, IMG, impl="triton"), want)
    # With the count given up front (no host sync on the GPU) the result is the same.
    _assert_same(packed_metadata(tokens, cu, IMG, impl="triton", num_image_tokens=want[1].numel()), want)


@pytest.mark.parametrize("token_dtype, cu_dtype", [(torch.int32, torch.int64), (torch.int64, torch.int64)])
def test_index_dtypes(token_dtype, cu_dtype, device):
    tokens, cu = _batch(200, 3, 0.5, device, token_dtype, cu_dtype)
    _assert_same(packed_metadata(tokens, cu, IMG, impl="triton"), packed_metadata_reference(tokens, cu, IMG))


def test_known_values_and_empty(device):
    tokens = torch.tensor([1, IMG, IMG, 2, IMG, 3], device=device)
    cu = torch.tensor([0, 2, 2, 6], dtype=torch.int32, device=device)
    pos, img = packed_metadata(tokens, cu, IMG, impl="triton")
    assert pos.tolist() == [0, 1, 0, 1, 2, 3] and img.tolist() == [1, 2, 4]
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    pos, img = packed_metadata(empty, torch.zeros(2, dtype=torch.int32, device=device), IMG, impl="triton")
    assert pos.numel() == 0 and img.numel() == 0


def test_wrong_count_hint_truncates_or_pads(device):
    tokens, cu = _batch(100, 2, 0.5, device)
    _, want = packed_metadata_reference(tokens, cu, IMG)
    m = want.numel()
    _, short = packed_metadata(tokens, cu, IMG, impl="triton", num_image_tokens=m - 3)
    _, long = packed_metadata(tokens, cu, IMG, impl="triton", num_image_tokens=m + 2)
    assert torch.equal(short, want[: m - 3])
    assert torch.equal(long[:m], want) and long[m:].tolist() == [-1, -1]


def test_errors():
    tokens, cu = torch.zeros(10, dtype=torch.int64), torch.tensor([0, 4, 10], dtype=torch.int32)
    bad = [
        ((tokens.view(2, 5), cu), "tokens must be a 1-D"),
        ((tokens.float(), cu), "tokens must be a 1-D int64/int32"),
        ((tokens, torch.tensor([0])), "B\\+1 >= 2"),
        ((tokens, cu.float()), "cu_seqlens must be a 1-D int32/int64"),
        ((tokens, torch.tensor([1, 4, 10])), "from 0 to N=10"),
        ((tokens, torch.tensor([0, 4, 9])), "from 0 to N=10"),
        ((tokens, torch.tensor([0, 6, 4, 10])), "non-decreasing"),
        ((tokens, cu.to("meta")), "one device"),
    ]
    for (t, c), match in bad:
        with pytest.raises(ValueError, match=match):
            packed_metadata(t, c, IMG, impl="triton")
    with pytest.raises(ValueError, match="num_image_tokens"):
        packed_metadata(tokens, cu, IMG, impl="triton", num_image_tokens=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("n, b", [(8192, 4), (65536, 37), (65537, 1)])
def test_compiled_matches_reference_at_real_sizes(n, b):
    tokens, cu = _batch(n, b, 0.4, "cuda")
    _assert_same(packed_metadata(tokens, cu, IMG), packed_metadata_reference(tokens, cu, IMG))
