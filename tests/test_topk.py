"""linear_topk: the k largest logits per row streamed over class chunks (marginkern/topk.py), against torch.topk of
the materialised logits."""
import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern import topk


def materialised(x, w, bias=None, normalize=False, softcap=None):
    """The logits in float64, written out."""
    x, w = x.double(), w.double()
    if normalize:
        x, w = F.normalize(x, dim=-1), F.normalize(w, dim=1)
    z = x @ w.T
    if bias is not None:
        z = z + bias.double()
    return z if softcap is None else softcap * torch.tanh(z / softcap)


TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}  # fp32 GEMMs


@pytest.fixture(params=[None, (4 * 300 * 8, 1), (4 * 128 * 16, 16)], ids=["one-chunk", "many-chunks", "row-blocks"])
def chunk_bytes(request, monkeypatch):
    """One chunk; chunks of 8 classes at N = 300 rows of fp32 (fewer classes than k in a chunk); or blocks of 128 rows
    (at least 16 classes a chunk: more than 300 rows' would not fit)."""
    if request.param is not None:
        monkeypatch.setattr(topk, "CHUNK_BYTES", request.param[0])
        monkeypatch.setattr(topk, "MIN_CHUNK_CLASSES", request.param[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", [dict(), dict(bias=True), dict(bias=True, softcap=2.5), dict(normalize=True)],
                         ids=["plain", "bias", "bias-softcap", "normalize"])
def test_matches_the_materialised_topk(chunk_bytes, dtype, options):
    torch.manual_seed(0)
    x, w = torch.randn(300, 24).to(dtype), torch.randn(101, 24).to(dtype)
    bias = torch.randn(101).to(dtype) if options.pop("bias", False) else None
    values, indices, lse = mk.linear_topk(x, w, 10, bias, return_lse=True, **options)
    z = materialised(x, w, bias, **options)
    want, want_indices = z.topk(10, dim=1)
    tol = TOLERANCE[dtype]
    assert values.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(values.double(), want, rtol=tol, atol=tol)
    # the classes hold those values (the data has no near-ties, so they are torch.topk's classes too)
    torch.testing.assert_close(z.gather(1, indices), want, rtol=tol, atol=tol)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(lse.double(), z.logsumexp(1), rtol=tol, atol=tol)


def test_token_shapes_and_k_at_the_ends():
    torch.manual_seed(1)
    x, w = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(13, 8, dtype=torch.float64)
    values, indices = mk.linear_topk(x, w, 13)  # k = C: every class, sorted
    assert values.shape == indices.shape == (2, 5, 13)
    torch.testing.assert_close(values, (x @ w.T).sort(-1, descending=True).values)
    values, indices, lse = mk.linear_topk(x, w, 1, return_lse=True)
    assert torch.equal(indices[..., 0], (x @ w.T).argmax(-1)) and lse.shape == (2, 5)
    empty = mk.linear_topk(torch.zeros(0, 8), torch.randn(13, 8), 3, return_lse=True)
    assert [tuple(t.shape) for t in empty] == [(0, 3), (0, 3), (0,)]


def test_nearest_class_centres_identify_the_embeddings():
    """normalize=True: an embedding near its class centre (any norm) finds that class first."""
    torch.manual_seed(2)
    centres = torch.randn(5000, 32)
    labels = torch.randint(0, 5000, (64,))
    emb = (F.normalize(centres[labels], dim=1) + 0.05 * torch.randn(64, 32)) * torch.rand(64, 1) * 10
    cosines, classes = mk.linear_topk(emb, centres, 5, normalize=True)
    assert torch.equal(classes[:, 0], labels)
    assert (cosines[:, 0] > 0.9).all() and (cosines <= 1.0 + 1e-6).all()


def test_teacher_topk_feeds_topk_distillation():
    """A teacher cached by linear_topk gives linear_topk_kl_divergence the loss of the materialised teacher's top-k."""
    torch.manual_seed(3)
    x, w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True), torch.randn(700, 16, dtype=torch.float64)
    tx, tw = torch.randn(40, 12, dtype=torch.float64), torch.randn(700, 12, dtype=torch.float64)
    values, indices = mk.linear_topk(tx, tw, 8)
    assert not values.requires_grad
    got = mk.linear_topk_kl_divergence(x, w, indices, values)
    want_values, want_indices = (tx @ tw.T).topk(8, dim=1)
    want = mk.linear_topk_kl_divergence(x, w, want_indices, want_values)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_no_gradient_and_compiles_once_over_lengths():
    """An op to torch.compile: new lengths (dynamic=True) reuse one graph (traced, the chunk sizes' dependence on N
    would guard and recompile at each)."""
    from torch._dynamo.testing import CompileCounter
    torch.manual_seed(4)
    w = torch.randn(50, 8, requires_grad=True)
    values, _ = mk.linear_topk(torch.randn(9, 8, requires_grad=True), w, 3)
    assert not values.requires_grad
    counter = CompileCounter()
    compiled = torch.compile(lambda a, b: mk.linear_topk(a, b, 3, return_lse=True), fullgraph=True, backend=counter,
                             dynamic=True)
    for n in (9, 17, 33, 65, 300):
        x = torch.randn(n, 8)
        for got, want in zip(compiled(x, w), mk.linear_topk(x, w, 3, return_lse=True)):
            torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


def test_opcheck():
    x, w, bias = torch.randn(7, 8), torch.randn(40, 8), torch.randn(40)
    torch.library.opcheck(torch.ops.marginkern.linear_topk.default, (x, w, 5, bias, False, 2.0, True))
    torch.library.opcheck(torch.ops.marginkern.linear_topk.default, (x, w, 5, None, True, None, False))


def test_chunks_bound_the_upcast_weight_rows_too():
    """16-bit weights on the CPU are upcast chunk by chunk: at small N the chunk's weight rows bound it, not only its
    logits; very long inputs go by blocks of rows."""
    rows, classes = topk.chunk_shape(4, 512, 4, upcast_weight=True)
    assert classes * 512 * 4 <= topk.CHUNK_BYTES and 4 * classes * 4 <= topk.CHUNK_BYTES
    assert topk.chunk_shape(4, 512, 4, upcast_weight=False)[1] > classes
    rows, classes = topk.chunk_shape(1 << 20, 64, 4, upcast_weight=False)
    assert classes == topk.MIN_CHUNK_CLASSES and rows * classes * 4 <= topk.CHUNK_BYTES


def test_bad_arguments_are_named():
    x, w = torch.randn(4, 8), torch.randn(10, 8)
    for k in (0, 11):
        with pytest.raises(ValueError, match=r"k must lie in \[1, C=10\]"):
            mk.linear_topk(x, w, k)
    with pytest.raises(TypeError, match="k must be an int"):
        mk.linear_topk(x, w, 2.0)
    with pytest.raises(ValueError, match=r"weight must have shape \(C ≥ 1, D=8\)"):
        mk.linear_topk(x, torch.randn(10, 7), 2)
    with pytest.raises(TypeError, match="weight must have the dtype and device of input"):
        mk.linear_topk(x, w.double(), 2)
    with pytest.raises(ValueError, match="normalize=True ranks cosines: bias and softcap must be None"):
        mk.linear_topk(x, w, 2, torch.zeros(10), normalize=True)
    with pytest.raises(ValueError, match="softcap must lie in"):
        mk.linear_topk(x, w, 2, softcap=0.0)
    with pytest.raises(ValueError, match=r"bias must have shape \(C=10,\)"):
        mk.linear_topk(x, w, 2, torch.zeros(9))
    with pytest.raises(TypeError, match="input must be float16, bfloat16, float32 or float64"):
        mk.linear_topk(x.long(), w.long(), 2)
    with pytest.raises(ValueError, match=r"input must have shape \(N, D\)"):
        mk.linear_topk(torch.randn(8), w, 2)
