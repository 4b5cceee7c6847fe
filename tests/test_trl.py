"""marginkern.trl: TRL's fused LM head on marginkern, against TRL's own function (trl.kernels.chunked_logprob), the
float64 definition of each field, TRL's fused forward of Hugging Face models and a TRL SFTTrainer run."""
import copy

import pytest
import torch

trl = pytest.importorskip("trl")
chunked_logprob = pytest.importorskip("trl.kernels.chunked_logprob")

import marginkern.trl as mk_trl  # noqa: E402
from marginkern.trl import OUTPUTS, FusedLogProbs, patch_trl, unpatch_trl  # noqa: E402
from tests.helpers import assert_close_rel  # noqa: E402

TRLFunction = chunked_logprob.ChunkedLogProbFunction
EXTRA = OUTPUTS[1:]  # what a call asks for besides log_probs


def definition(hidden, weight, bias, targets, temperature, softcap, scale):
    """The five fields on materialised float64 logits: z = softcap(s·(h·wᵀ + b))/T, as TRL's docstring defines them."""
    z = hidden.double() @ weight.double().t() + (0.0 if bias is None else bias.double())
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    log_p = z.log_softmax(-1)
    log_pt = log_p.gather(-1, targets[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_pt, entropy, torch.logsumexp(2 * log_p, -1), z.mean(-1), z.argmax(-1) == targets


def case(dtype=torch.float32, with_bias=False, N=37, V=301, D=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, D, generator=g) * 1.5).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=g).to(dtype).requires_grad_() if with_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    logits = hidden.detach().double() @ weight.detach().double().t()
    targets[:6] = logits[:6].argmax(-1)  # rows whose label is the most likely token (without the bias)
    return hidden, weight, bias, targets


def fields_and_grads(fn, hidden, weight, bias, targets, *args, upstream=None):
    """fn's five fields and the gradients of Σ g·log_probs + g'·entropy for the inputs that take one."""
    out = fn(hidden, weight, bias, targets, *args)
    g = torch.Generator().manual_seed(7)
    g_lp, g_h = torch.randn(targets.shape[0], generator=g), torch.randn(targets.shape[0], generator=g)
    loss = (out[0].double() * g_lp).sum() + (out[1].double() * g_h).sum()
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    return [None if o is None else o.detach() for o in out], torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fields_and_gradients_equal_trls_function(temperature, softcap, scale, with_bias):
    """fp32: every field and the gradients for hidden, weight and bias equal TRL's function (in chunks of 64 classes:
    its online statistics across chunks) and the float64 definition."""
    hidden, weight, bias, targets = case(with_bias=with_bias)
    args = (temperature, 64, softcap, scale, EXTRA)
    got, got_grads = fields_and_grads(FusedLogProbs.apply, hidden, weight, bias, targets, *args)
    want, want_grads = fields_and_grads(TRLFunction.apply, hidden, weight, bias, targets, *args)
    exact = definition(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), targets,
                       temperature, softcap, scale)
    for name, g, w, e in zip(OUTPUTS, got, want, exact):
        if name == "is_top1":
            assert torch.equal(g, w) and torch.equal(g, e) and g[:6].sum() >= 4, name
            continue
        assert g.dtype == torch.float32, name
        assert_close_rel(g, w, torch.float32, name, floor=1.0)
        assert_close_rel(g, e, torch.float32, name, floor=1.0)
    for g, w in zip(got_grads, want_grads):
        assert_close_rel(g, w, torch.float32, "grad", floor=1.0)


def test_bf16_operands_are_closer_to_the_definition_than_trls():
    """bf16 hidden states and head: TRL rounds each chunk's logits to bf16 before its statistics, marginkern takes
    them as fp32 dot products; both against the float64 definition on the same bf16 operands."""
    hidden, weight, bias, targets = case(torch.bfloat16, with_bias=True, N=64, V=500, D=64)
    args = (0.9, 4096, 30.0, 1.0, EXTRA)
    got = FusedLogProbs.apply(hidden, weight, bias, targets, *args)
    want = TRLFunction.apply(hidden, weight, bias, targets, *args)
    exact = definition(hidden.detach(), weight.detach(), bias.detach(), targets, 0.9, 30.0, 1.0)
    for name, g, w, e in list(zip(OUTPUTS, got, want, exact))[:4]:
        ours, theirs = (g.double() - e).abs().max().item(), (w.double() - e).abs().max().item()
        assert ours < 1e-4 and ours < theirs, (name, ours, theirs)


def test_autocast_computes_in_the_autocast_dtype():
    """An fp32 head under a bf16 autocast (TRL's compute dtype): the operands rounded to bf16, as TRL's chunks; the
    gradients come back in fp32."""
    hidden, weight, bias, targets = case(with_bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, grads = fields_and_grads(FusedLogProbs.apply, hidden, weight, bias, targets, 1.0, 64, None, 1.0, EXTRA)
    rounded = [t.detach().to(torch.bfloat16) for t in (hidden, weight, bias)]
    exact = definition(*rounded, targets, 1.0, None, 1.0)
    for name, g, e in list(zip(OUTPUTS, got, exact))[:4]:
        assert_close_rel(g, e, torch.float32, name, floor=1.0)
    assert [g.dtype for g in grads] == [torch.float32] * 3


def test_only_the_asked_fields_and_their_gradients():
    hidden, weight, bias, targets = case()
    out = FusedLogProbs.apply(hidden, weight, bias, targets, 1.0, 64, None, 1.0, ("entropy",))
    assert [o is None for o in out] == [False, False, True, True, True]
    out = FusedLogProbs.apply(hidden, weight, bias, targets, 1.0, 64, None, 1.0, ("log_sum_sq_probs", "mean_logits"))
    assert [o is None for o in out] == [False, True, False, False, True]
    assert out[0].requires_grad and not out[2].requires_grad and not out[3].requires_grad
    with pytest.raises(ValueError, match="unknown fields.*'logits'"):
        FusedLogProbs.apply(hidden, weight, bias, targets, 1.0, 64, None, 1.0, ("logits",))
    partitioned = weight.detach().clone()
    partitioned.ds_id = 3  # what DeepSpeed ZeRO-3 sets on the parameters it partitions
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        FusedLogProbs.apply(hidden, partitioned, bias, targets, 1.0, 64, None, 1.0, ())


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_a_batch_without_labelled_tokens(softcap):
    """TRL compacts the labelled positions on a GPU: a microbatch without any gives 0 rows, and zero gradients."""
    hidden, weight, bias, _ = case(with_bias=True)
    out = FusedLogProbs.apply(hidden[:0], weight, bias, torch.zeros(0, dtype=torch.long), 0.7, 64, softcap, 0.5,
                              EXTRA)
    assert [tuple(o.shape) for o in out] == [(0,)] * 5
    grads = torch.autograd.grad(out[0].sum() + out[1].sum(), (hidden, weight, bias))
    assert all(not g.any() for g in grads)


def tiny_model(model_type):
    from tests.test_huggingface import tiny_model as make
    return make(model_type)


@pytest.fixture
def patched():
    patch_trl()
    yield
    unpatch_trl()


ENTROPY_WEIGHT = 0.1  # the entropy's share of the loss whose gradients are compared


def fused_forward(model):
    """TRL's fused forward of a tiny model on tests.test_huggingface's batch: its output and every parameter's
    gradient of the loss plus a weighted sum of the entropies."""
    from tests.test_huggingface import batch
    ids, labels = batch()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    weights = torch.linspace(-ENTROPY_WEIGHT, ENTROPY_WEIGHT, out.entropy.numel()).reshape(out.entropy.shape)
    (out.loss + (out.entropy * weights).sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def materialised_forward(model, temperature):
    """The same fields and gradients from the model's own (B, T, V) logits (its logit transform inside), in float64
    (on a copy: before add_fused_lm_head, whose forward calls the model's original bound forward)."""
    from tests.test_huggingface import batch
    model = copy.deepcopy(model).double()
    ids, labels = batch()
    z = model(input_ids=ids).logits[:, :-1] / temperature
    target = labels[:, 1:]
    mask = target != -100
    log_p = z.log_softmax(-1)
    fields = {"log_probs": log_p.gather(-1, target.clamp(min=0)[..., None])[..., 0] * mask,
              "entropy": -(log_p.exp() * log_p).sum(-1) * mask,
              "log_sum_sq_probs": torch.logsumexp(2 * log_p, -1) * mask, "mean_logits": z.mean(-1) * mask,
              "is_top1": (z.argmax(-1) == target) & mask}
    weights = torch.linspace(-ENTROPY_WEIGHT, ENTROPY_WEIGHT, mask.numel(), dtype=torch.float64).reshape(mask.shape)
    (-fields["log_probs"].sum() / mask.sum() + (fields["entropy"] * weights).sum()).backward()
    return fields, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type, temperature", [("llama", 1.0), ("llama", 0.7), ("gemma2", 0.9),
                                                     ("cohere", 1.0), ("granite", 0.8), ("phi", 1.0)])
def test_trls_fused_forward_of_a_model(model_type, temperature):
    """A Hugging Face model with TRL's fused head (add_fused_lm_head), patched: every field and every parameter's
    gradient against the model's own logits in float64 (Gemma 2's softcap, Cohere's and Granite's logit scale, Phi's
    head bias), each gradient to 1e-5 of its largest element (TRL's own fp32 head: up to 2e-5 here), and against
    TRL's fused forward; unpatched, TRL's function runs again."""
    from trl.trainer.utils import add_fused_lm_head
    model = tiny_model(model_type)
    exact, exact_grads = materialised_forward(model, temperature)
    add_fused_lm_head(model, temperature=temperature, outputs=OUTPUTS)
    want, _ = fused_forward(model)
    patch_trl()
    try:
        calls = []
        apply = FusedLogProbs.apply
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(FusedLogProbs, "apply", lambda *a: calls.append(1) or apply(*a))
            got, got_grads = fused_forward(model)
        assert calls == [1]
    finally:
        unpatch_trl()
    import trl.trainer.utils as utils
    assert utils._ChunkedLogProbFunction is TRLFunction
    assert_close_rel(got.loss, want.loss, torch.float32, "loss", floor=1.0)
    for name in OUTPUTS:
        g, w, e = getattr(got, name), getattr(want, name), exact[name]
        if name == "is_top1":
            assert torch.equal(g, w) and torch.equal(g, e)
        else:
            torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5)
    assert got_grads.keys() == exact_grads.keys()
    assert (model_type == "phi") == ("lm_head.bias" in got_grads)
    for name, e in exact_grads.items():
        error = (got_grads[name].double() - e).abs().max() / e.abs().max().clamp_min(1e-30)
        assert error < 1e-5, (name, error.item())


def test_patch_is_idempotent_and_undone(patched):
    import trl.trainer.utils as utils
    assert utils._ChunkedLogProbFunction is FusedLogProbs
    patch_trl()
    unpatch_trl()
    assert utils._ChunkedLogProbFunction is TRLFunction
    unpatch_trl()  # nothing left to undo
    assert utils._ChunkedLogProbFunction is TRLFunction and mk_trl._replaced == []
    patch_trl()  # (the fixture's unpatch restores TRL's)


# (TRL's SFTConfig sets the field transformers 5.25 renamed)
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_an_sft_trainer_step_runs_on_marginkern(tmp_path, patched):
    """TRL's SFTTrainer (its fused head, loss_type "nll") trains a tiny model on marginkern: the head's calls are
    marginkern's, and the logged loss, entropy and token accuracy equal an unpatched run's (in fp32: SFTConfig's
    default bf16 autocast has TRL round each logit to bf16 first, 1e-4 of the loss here, where marginkern's are fp32
    dot products of the bf16 operands)."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 290, (n,), generator=g).tolist()} for n in (9, 12, 7, 11)]
    # the tiny model's ids as a word-level vocabulary (the collator pads with its pad token)
    vocabulary = Tokenizer(models.WordLevel({f"t{i}": i for i in range(300)}, unk_token="t0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocabulary, pad_token="t0", bos_token="t1", eos_token="t2")

    def run():
        config = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                           report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3, seed=0, bf16=False)
        trainer = SFTTrainer(model=tiny_model("llama"), args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
        trainer.train()
        return [log for log in trainer.state.log_history if "loss" in log]

    calls = []
    apply = FusedLogProbs.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FusedLogProbs, "apply", lambda *a: calls.append(1) or apply(*a))
        got = run()
    assert len(calls) >= 2
    unpatch_trl()
    want = run()
    patch_trl()
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), key
