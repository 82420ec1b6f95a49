"""The packing invariant: a sample's logits and loss are the same packed with others as alone, in one
process and under TP=2 and PP=2."""

import pytest
import torch

from tests.helpers.multiprocess import run_on_ranks
from tests.parallel import workers

# fp32 on the CPU. Packed rows attend through SDPA under a block-diagonal mask, lone rows through
# megatron-core's own attention, and TP reorders the reductions: measured max |diff| ~1e-6.
ATOL = 2e-5


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("weights"))
    run_on_ranks(workers.reference_run, 1, directory)
    return directory


@pytest.fixture(scope="module")
def single(weights):
    (out,) = run_on_ranks(workers.packed_vs_alone, 1, 1, 1, weights)
    return out


def _check(out):
    cu = out["cu"].tolist()
    assert len(cu) == 4 and cu[-1] == out["packed_logits"].shape[1]
    for i in range(3):
        start, end = cu[i], cu[i + 1]
        n = end - start
        torch.testing.assert_close(out["packed_logits"][0, start:end], out["alone_logits"][i][0, :n], atol=ATOL, rtol=0)
        torch.testing.assert_close(out["packed_losses"][0, start:end], out["alone_losses"][i][0, :n], atol=ATOL, rtol=0)


def test_packed_equals_alone_single_process(single):
    _check(single)
    # Not vacuous: the samples differ, so a leak across boundaries would show.
    assert not torch.allclose(single["alone_logits"][0][0, :10], single["alone_logits"][1][0, :10])


def test_packed_equals_alone_aimv2_qwen3_single_process():
    # The AIMv2 + Qwen3 model (q/k norms, explicit head_dim) keeps the invariant too.
    (out,) = run_on_ranks(workers.packed_vs_alone, 1, 1, 1, None, "tiny-sail-vl2")
    _check(out)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_packed_equals_alone_under_layouts(weights, single, tp, pp):
    (out,) = [o for o in run_on_ranks(workers.packed_vs_alone, tp * pp, tp, pp, weights) if o is not None]
    _check(out)
    torch.testing.assert_close(out["packed_logits"], single["packed_logits"], atol=ATOL, rtol=0)
