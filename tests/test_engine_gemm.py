"""The engine's GEMM helpers: the 16-bit → fp32 cuBLAS overloads are probed once per dtype, a missing one
falls back to an upcast GEMM, and an out-of-memory is never swallowed. The CUDA branch is forced on the
CPU (where torch has no out_dtype kernels) so that the fallback path runs here."""
import pytest
import torch

import marginkern.engine as engine


@pytest.fixture
def cuda_branch(monkeypatch):
    monkeypatch.setattr(engine, "_is_16bit_cuda_pair", lambda a, b: True)
    monkeypatch.setattr(engine, "_OUT_DTYPE_WORKS", {})
    return engine._OUT_DTYPE_WORKS


def test_missing_overload_falls_back_once_and_is_remembered(cuda_branch, monkeypatch):
    a, b = torch.randn(5, 7).bfloat16(), torch.randn(7, 3).bfloat16()
    want = a.float() @ b.float()
    torch.testing.assert_close(engine.mm_accumulate(a, b, torch.float32), want)
    assert cuda_branch == {("mm", torch.bfloat16): False}  # CPU torch has no mm.dtype kernel
    out = torch.ones(5, 3)
    engine.addmm_accumulate(out, a, b, alpha=2.0)
    torch.testing.assert_close(out, 1 + 2 * want)
    assert cuda_branch[("addmm", torch.bfloat16)] is False

    calls = []
    monkeypatch.setattr(torch, "mm", lambda *args, **kw: calls.append(kw) or torch.matmul(args[0], args[1]))
    engine.mm_accumulate(a, b, torch.float32)
    assert all("out_dtype" not in kw for kw in calls)  # not probed again


def test_out_of_memory_is_not_swallowed(cuda_branch, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch, "mm", oom)
    with pytest.raises(torch.OutOfMemoryError):
        engine.mm_accumulate(torch.randn(2, 2).half(), torch.randn(2, 2).half(), torch.float32)
    assert ("mm", torch.float16) not in cuda_branch
