"""Providers every (N, D, C) classification case shares: inputs, the 3-GEMM floor, torch.compile; and the LM-head
shapes of the families beside linear CE."""
import importlib
import os
import shutil

import torch

from harness import Case, Skip, Step


def lm_head_cases(family, device_type, quick, tiny_cpu_case=False):
    """The LM-head cases of a family (EMO, RL, distillation): on CUDA (2048, 1024, 32000) and Llama-3-8B's
    (8192, 4096, 128256) in bf16; on the CPU (512, 256, 16384) and the csrc issue's (512, 128, 200000) in fp32
    (naive PyTorch grows RSS by ≈ 1.3 GB there), led by a tiny (64, 64, 4096) where `tiny_cpu_case`."""
    if device_type == "cuda":
        cases = [Case(f"{family}-small-32k", 2048, 1024, 32_000, "bfloat16"),
                 Case(f"{family}-llama3-8b", 8192, 4096, 128_256, "bfloat16")]
    else:
        cases = ([Case(f"cpu-{family}-4k", 64, 64, 4_096, "float32")] if tiny_cpu_case else []) + [
            Case(f"cpu-{family}-16k", 512, 256, 16_384, "float32"),
            Case(f"cpu-{family}-200k", 512, 128, 200_000, "float32")]
    return cases[:1] if quick else cases


def make_inputs(case, device):
    """x (N, D), w (C, D) with gradients, integer targets (N,); same values for every provider of a case
    because the worker seeds the generator before building. w is scaled by 1/√D like a Linear layer's
    init, so unnormalized logits are O(1) and the loss values of providers are comparable in bf16."""
    x = torch.randn(case.N, case.D, device=device, dtype=case.torch_dtype).requires_grad_()
    w = (torch.randn(case.C, case.D, device=device, dtype=case.torch_dtype) / case.D ** 0.5).requires_grad_()
    target = torch.randint(0, case.C, (case.N,), device=device)
    return x, w, target


def peer_attribute(peer, module_name, name, device):
    """`name` from an optional peer's module (liger-kernel, cut-cross-entropy: CUDA only); Skip with the reason when
    the peer is not importable or the device is not CUDA."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise Skip(f"{peer} not importable ({exc})")
    if device.type != "cuda":
        raise Skip(f"{peer} runs on CUDA only")
    return getattr(module, name)


def loss_step(loss_fn, case, device):
    """Step that runs loss_fn(x, w, target) forward and backward into x.grad and w.grad."""
    x, w, target = make_inputs(case, device)

    def fn():
        loss = loss_fn(x, w, target)
        loss.backward()
        return loss.detach()

    return Step(fn, [x, w])


def with_env(env, build):
    """The provider `build` with the environment variables `env` set during its calls (and restored after)."""
    def build_with_env(case, device):
        step = build(case, device)

        def fn():
            previous = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                return step.fn()
            finally:
                for k, v in previous.items():
                    if v is None:
                        del os.environ[k]
                    else:
                        os.environ[k] = v

        return Step(fn, step.grads_of)
    return build_with_env


def on_backend(backend, build):
    """The provider `build` with marginkern's backend forced to `backend` (MARGINKERN_BACKEND) during its
    calls; Skip with the reason when that backend cannot serve the case here (dispatch.py)."""
    def build_on_backend(case, device):
        from marginkern.dispatch import _why_not
        reason = _why_not(backend, device, case.torch_dtype)
        if reason:
            raise Skip(f"backend {backend}: {reason}")
        return with_env({"MARGINKERN_BACKEND": backend}, build)(case, device)
    return build_on_backend


def cuda_graphed(build):
    """The provider `build` replayed from a CUDA graph: the step's kernels without its host-side cost
    (Python, dispatch, launches), i.e. how far a user's CUDA-graph capture of the step could take it. The
    graph's memory pool is allocated at capture, before the timed calls: its "extra MB" is not comparable."""
    def build_graphed(case, device):
        if device.type != "cuda":
            raise Skip("CUDA graphs need CUDA")
        step = build(case, device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (Triton compiles, cuBLAS handles)
            for _ in range(3):
                for t in step.grads_of:
                    t.grad = None
                step.fn()
        torch.cuda.current_stream().wait_stream(side)
        for t in step.grads_of:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = step.fn()

        def replay():
            graph.replay()
            return loss

        return Step(replay, [], memory_not_comparable="the graph's memory pool is allocated at capture")
    return build_graphed


def gemm_floor(case, device):
    """The three plain GEMMs an exact fwd+bwd cannot avoid, same shapes and dtype, timed together:
    logits X·Wᵀ (N×C), dX = G·W (N×D), dW = Gᵀ·X (C×D), with G an N×C tensor made beforehand.
    dX and dW are written into buffers made here (they stand for the gradients a user holds anyway);
    the N×C logits are allocated per call, so the floor's extra memory is what materializing them costs."""
    x, w, _ = make_inputs(case, device)
    x, w = x.detach(), w.detach()
    g = torch.randn(case.N, case.C, device=device, dtype=case.torch_dtype)
    dx = torch.empty_like(x)
    dw = torch.empty_like(w)

    def fn():
        x @ w.t()  # the logits: computed and dropped, the floor has no softmax and no loss
        torch.mm(g, w, out=dx)
        torch.mm(g.t(), x, out=dw)

    return Step(fn, [])


def compiled(loss_fn, device):
    """torch.compile(loss_fn), or Skip with the reason when this machine has no compiler for inductor."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401  (inductor's GPU code generator)
        except ImportError:
            raise Skip("torch.compile needs triton on CUDA, and triton is not importable")
    else:
        cxx = os.environ.get("CXX") or "g++"
        if not any(shutil.which(c) for c in (cxx, "c++", "clang++")):
            raise Skip("torch.compile on CPU needs a C++ compiler; none found on PATH")
    return torch.compile(loss_fn, dynamic=False)
