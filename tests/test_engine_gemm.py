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


@pytest.mark.parametrize("shape, reduction, want", [
    ((256, 512), 16384, 16),     # face-small's dX: 8 output tiles, partials cap 8 MB / 512 KB = 16
    ((1024, 512), 20000, 4),     # ArcFace 1M's dX: 32 tiles would want 9, the 8 MB cap allows 4
    ((256, 512), 3000, 2),       # each slice keeps ≥ 1024 classes
    ((256, 512), 900, 1),
    ((384, 512), 20000, 8),      # 10 would fit; a power of two divides every full chunk (no remainder GEMM)
    ((8192, 4096), 50000, 1),    # LLM shapes fill the GPU on their own
])
def test_split_k_slices_fill_the_gpu_within_the_partials_cap(shape, reduction, want, monkeypatch):
    monkeypatch.delenv("MARGINKERN_SPLIT_K", raising=False)
    out = torch.empty(shape)
    assert engine.split_k_slices(out, reduction, sm_count=132) == want
    assert engine.split_k_slices(out, reduction) == 1  # a CPU tensor: never split


def test_split_k_slices_env_override(monkeypatch):
    monkeypatch.setenv("MARGINKERN_SPLIT_K", "5")
    assert engine.split_k_slices(torch.empty(8192, 4096), 50000, sm_count=132) == 5
    assert engine.split_k_slices(torch.empty(2, 2), 3) == 3  # never more slices than reduction steps
    monkeypatch.setenv("MARGINKERN_SPLIT_K", "1")
    assert engine.split_k_slices(torch.empty(256, 512), 16384, sm_count=132) == 1


@pytest.mark.parametrize("slices", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_k_accumulator_matches_one_gemm_per_chunk(slices, dtype):
    """Chunks of 37 (remainder columns), 40 and 2 (shorter than the slices) columns, summed once."""
    torch.manual_seed(0)
    out = torch.randn(6, 5, dtype=dtype)
    want = out.clone()
    acc = engine.SplitKAccumulator(out, slices)
    for K in (37, 40, 2):
        a, b = torch.randn(6, K, dtype=dtype), torch.randn(K, 5, dtype=dtype)
        acc.add(a, b)
        want += a @ b
    assert acc.result() is out
    torch.testing.assert_close(out, want)
    assert acc.result() is out  # a second call adds nothing more
    torch.testing.assert_close(out, want)


def test_split_k_accumulator_reads_a_column_slice_of_g_without_copies():
    """G may be an (N, chunk) column slice of a wider buffer: the batched views follow its row stride."""
    torch.manual_seed(1)
    wide = torch.randn(4, 50)
    a, b = wide[:, 10:40], torch.randn(30, 3)
    out = torch.zeros(4, 3)
    acc = engine.SplitKAccumulator(out, 4)
    acc.add(a, b)
    torch.testing.assert_close(acc.result(), a @ b)


def test_split_k_accumulator_falls_back_without_the_16bit_batched_overload(cuda_branch):
    a, b = torch.randn(5, 3000).bfloat16(), torch.randn(3000, 4).bfloat16()
    out = torch.zeros(5, 4)
    acc = engine.SplitKAccumulator(out, 3)
    acc.add(a, b)
    acc.add(a, b)
    torch.testing.assert_close(acc.result(), 2 * (a.float() @ b.float()), rtol=1e-5, atol=1e-4)
    assert cuda_branch[("baddbmm", torch.bfloat16)] is False  # CPU torch has no baddbmm.dtype kernel


@pytest.mark.parametrize("loss", ["margin", "linear", "emo"])
def test_losses_with_split_k_match_without(loss, monkeypatch):
    """The engine's chunk loop (reference backend) with dX cut into 3 slices per chunk gives the same loss
    and gradients as one GEMM per chunk (fp32: accumulation order only)."""
    import marginkern as mk
    from tests.helpers import assert_close_rel, loss_and_grads, make_case
    fn = {"margin": lambda x, w, t: mk.margin_cross_entropy(x, w, t, reduction="none"),
          "linear": lambda x, w, t: mk.linear_cross_entropy(x, w, t, reduction="none"),
          "emo": lambda x, w, t: mk.emo_cross_entropy(x, w, t, reduction="none")}[loss]
    monkeypatch.setenv("MARGINKERN_BACKEND", "reference")
    x, w, t = make_case(9, 5000, 16)
    monkeypatch.setenv("MARGINKERN_SPLIT_K", "1")
    want = loss_and_grads(fn, x, w, t)
    monkeypatch.setenv("MARGINKERN_SPLIT_K", "3")
    got = loss_and_grads(fn, x, w, t)
    for g, e, what in zip(got, want, ("loss", "dX", "dW")):
        assert_close_rel(g, e, torch.float32, what)  # fp32: relative to the largest entry
