"""Micro-benchmarks of the engine's pieces with pytest-benchmark, for tuning one step at a time (the
end-to-end comparison with naive PyTorch, torch.compile, peers and the floor is bench/run.py):

    pip install pytest-benchmark
    python -m pytest bench/test_microbench.py --benchmark-only [--benchmark-json out.json]

Runs on CUDA when present (bf16, GPU sizes; the timed function synchronises), else on the CPU (fp32,
small sizes). Not part of the test suite: CI runs tests/ only.
"""
import pytest
import torch

import marginkern as mk
from marginkern.dispatch import select_tiles
from marginkern.engine import LogitSpec, streaming_grads, streaming_row_stats

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (N, D, C): an LLM head and a face head; small enough for a 2-core CPU
SHAPES = {"llm": (8192, 4096, 128_256) if CUDA else (512, 256, 16_384),
          "face": (1024, 512, 1_000_000) if CUDA else (256, 128, 20_000)}


def synchronized(fn):
    """fn, waited for on the GPU, and run once before timing (Triton compiles its kernels on first use)."""
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out
    run()
    return run


def inputs(shape):
    N, D, C = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(N, D, generator=gen).to(DEVICE, DTYPE)
    w = (torch.randn(C, D, generator=gen) / D ** 0.5).to(DEVICE, DTYPE)
    t = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    return x, w, t


def plain_spec(x, t):
    acc = torch.float32 if x.dtype != torch.float64 else torch.float64
    ones = torch.ones(x.shape[0], dtype=acc, device=x.device)
    return LogitSpec(ones, None, None, None, t, torch.zeros_like(ones))


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_forward_row_stats(benchmark, case):
    """The forward step alone: logits tile by tile, online log-sum-exp (1 GEMM-equivalent)."""
    x, w, t = inputs(SHAPES[case])
    tiles, spec = select_tiles(x.device, x.dtype), plain_spec(x, t)
    benchmark(synchronized(lambda: streaming_row_stats(x, w, spec, False, tiles)))


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_backward_chunk_loop(benchmark, case):
    """The backward step alone: dL/da per class chunk, dX and dW GEMMs (3 GEMM-equivalents)."""
    x, w, t = inputs(SHAPES[case])
    tiles, spec = select_tiles(x.device, x.dtype), plain_spec(x, t)
    lse, _ = streaming_row_stats(x, w, spec, False, tiles)
    coef = torch.full_like(lse, 1.0 / x.shape[0])
    benchmark(synchronized(lambda: streaming_grads(x, w, spec, lse, coef, torch.zeros_like(coef), -coef, tiles)))


@pytest.mark.parametrize("loss", ["linear_cross_entropy", "margin_cross_entropy"])
def test_loss_forward_backward(benchmark, loss):
    x, w, t = inputs(SHAPES["llm" if loss == "linear_cross_entropy" else "face"])
    x.requires_grad_()
    w.requires_grad_()
    fn = getattr(mk, loss)

    def step():
        x.grad = w.grad = None
        fn(x, w, t).backward()

    benchmark(synchronized(step))


def test_cosent_from_embeddings(benchmark):
    B, D = (65_536, 768) if CUDA else (8192, 256)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(B, D, generator=gen).to(DEVICE, DTYPE).requires_grad_() for _ in range(2))
    labels = torch.rand(B, generator=gen).to(DEVICE)

    def step():
        a.grad = b.grad = None
        mk.cosent_embedding_loss(a, b, labels).backward()

    benchmark(synchronized(step))
