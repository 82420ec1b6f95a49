"""Parallel layouts give the single-process numbers: TP=2 and PP=2 forward/backward for the InternViT +
Qwen2 model, TP2 x PP2 for the AIMv2 + Qwen3 model (SwiGLU ViT, q/k norms, head_dim, tied embeddings)."""

import pytest
import torch

from sail_megatron.platform import detect_backends
from tests.helpers.multiprocess import run_on_ranks
from tests.parallel import workers

# fp32 on the CPU; TP splits the reductions of attention/MLP, so sums run in another order.
LOGIT_ATOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


_REFERENCES = {}


@pytest.fixture
def reference(tmp_path_factory, preset):
    """The single-process run of `preset`, once per module."""
    if preset not in _REFERENCES:
        weights = str(tmp_path_factory.mktemp("weights"))
        (result,) = run_on_ranks(workers.reference_run, 1, weights, preset)
        _REFERENCES[preset] = weights, result
    return _REFERENCES[preset]


# Sequence parallelism needs TE (or apex) norms, so it runs where two GPUs and TE are present.
_SP = pytest.mark.skipif(
    not (detect_backends().layer_backend == "te" and torch.cuda.device_count() >= 2),
    reason="sequence parallel needs Transformer Engine layers on 2 GPUs",
)


@pytest.mark.parametrize(
    "preset,tp,pp,sp",
    [
        ("tiny", 2, 1, False),
        ("tiny", 1, 2, False),
        ("tiny-sail-vl2", 2, 2, False),  # TP and PP together (the model code both families share)
        pytest.param("tiny", 2, 1, True, marks=[pytest.mark.gpu, _SP]),
    ],
    ids=["tp2", "pp2", "aimv2-qwen3-tp2pp2", "tp2sp"],
)
def test_layout_matches_single_process(reference, tmp_path, preset, tp, pp, sp):
    weights, ref = reference
    dead = [n for n, g in ref["grads"].items() if not g.abs().sum() > 0]
    assert not dead, f"the reference gives these parameters no gradient, so comparing them proves nothing: {dead}"
    grads_dir = tmp_path / "grads"
    grads_dir.mkdir()
    grads_dir = str(grads_dir)
    outputs = run_on_ranks(workers.layout_run, tp * pp, tp, pp, weights, grads_dir, sp, preset)
    (out,) = [o for o in outputs if o is not None]
    torch.testing.assert_close(out["logits"], ref["logits"], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(out["losses"], ref["losses"], atol=LOGIT_ATOL, rtol=0)
    (grads,) = run_on_ranks(workers.read_full_checkpoint, 1, grads_dir, preset)
    assert grads.keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m: f"{name}: {m}")


def test_sequence_parallel_without_te_is_a_config_error():
    (message,) = run_on_ranks(workers.sequence_parallel_build_error, 2)[:1]
    assert message.startswith("parallel.sequence_parallel:") and "Fix:" in message
