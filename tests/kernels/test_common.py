"""The impl dispatch rule shared by the kernels, and that these tests really run Triton (not the reference)."""

import pytest
import torch
import triton
from triton.runtime.jit import JITFunction

from sail_megatron.kernels import merge_vision as merge_module
from sail_megatron.kernels._common import use_triton


def _compiled_kernel() -> JITFunction:
    # Built directly as a JITFunction: what @triton.jit gives when TRITON_INTERPRET is not set.
    def kernel(x_ptr):
        pass

    return JITFunction(kernel)


def test_dispatch_rule():
    cpu = torch.zeros(2)
    kernel = merge_module._merge_fwd_kernel
    assert use_triton("reference", kernel, cpu) is False
    assert use_triton("auto", kernel, cpu) is False  # CPU tensors: the reference
    with pytest.raises(ValueError, match="impl must be one of"):
        use_triton("gpu", kernel, cpu)


def test_triton_on_host_tensors_needs_the_interpreter():
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        use_triton("triton", _compiled_kernel(), torch.zeros(2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="kernels are compiled on a CUDA machine")
def test_kernels_are_interpreted_without_cuda(monkeypatch):
    # Guards the conftest: if the kernels were decorated compiled, impl="triton" tests could not run on CPU.
    assert not isinstance(merge_module._merge_fwd_kernel, JITFunction)
    calls = []
    original = merge_module._merge_fwd_triton
    monkeypatch.setattr(merge_module, "_merge_fwd_triton", lambda *a: calls.append(1) or original(*a))
    merge_module.merge_vision(torch.zeros(3, 2), torch.ones(1, 2), torch.tensor([1]), impl="triton")
    assert calls == [1]
    assert triton.knobs.runtime.interpret


def test_prefer_redirects_auto_only():
    from sail_megatron.kernels._common import prefer

    cpu = torch.zeros(2)
    kernel = merge_module._merge_fwd_kernel  # interpreted here
    with prefer("triton"):
        assert use_triton("auto", kernel, cpu) is True
        assert use_triton("reference", kernel, cpu) is False  # an explicit choice wins
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            use_triton("auto", _compiled_kernel(), cpu)
    with prefer("reference"):
        assert use_triton("auto", kernel, cpu) is False
    assert use_triton("auto", kernel, cpu) is False  # restored
    with pytest.raises(ValueError, match="impl must be one of"):
        with prefer("gpu"):
            pass
