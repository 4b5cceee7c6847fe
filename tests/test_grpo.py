"""GRPO and its relatives (marginkern.grpo) against TRL's GRPOTrainer arithmetic on materialised float64 logits."""
import pytest
import torch

import marginkern as mk
from marginkern.grpo import GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS
from tests.helpers import assert_close_rel


def trl_grpo(per_token_logps, advantages, completion_mask, old_per_token_logps, ref_per_token_logps, *, beta,
             epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level, max_completion_length,
             num_items_in_batch):
    """GRPOTrainer._compute_loss's arithmetic, in its own terms (completion_mask float)."""
    if beta != 0.0:
        per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps)
                        - 1)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * completion_mask).sum(-1)
                                  / completion_mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * completion_mask).sum() / (per_token_loss.size(0) * max_completion_length)
    else:
        normalizer = num_items_in_batch if num_items_in_batch is not None else completion_mask.sum()
        loss = (per_token_loss * completion_mask).sum() / normalizer

    def masked_batch_mean(x):
        if x.shape[1] == 1:
            return x.mean()
        return (x * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)

    if loss_type == "cispo":
        is_high = (coef_1 > epsilon_high) & (advantages > 0)
        is_low = torch.zeros_like(is_high)
    else:
        is_low = (coef_1 < 1 - epsilon_low) & (advantages < 0)
        is_high = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    low, high, region = (masked_batch_mean(f.float()) for f in (is_low, is_high, is_low | is_high))
    # TRL logs the KL when β ≠ 0 (it loads no reference otherwise); marginkern whenever a reference is given
    diff = ref_per_token_logps - per_token_logps
    kl = ((torch.exp(diff) - diff - 1) * completion_mask).sum() / completion_mask.sum()
    return loss, kl, low, high, region, per_token_loss * completion_mask


def materialised_log_probs(x, w, t, temperature=1.0, softcap=None):
    """(log p of the sampled tokens, entropy) per position on the full float64 logits (Gemma's softcap where given,
    then the temperature); 0 where t is ignored."""
    z = x.double() @ w.double().t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = (z / temperature).log_softmax(-1)
    mask = t != -100
    lp = log_p.gather(-1, torch.where(mask, t, 0)[..., None])[..., 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    return torch.where(mask, lp, 0.0), entropy, mask


def grpo_case(B=5, T=7, D=12, V=40, dtype=torch.float64, device="cpu", seed=0, token_advantages=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, 4:] = -100          # a short completion
    t[3, :] = -100           # one with no counted token
    A = torch.randn((B, T) if token_advantages else (B,), generator=g, dtype=torch.float64)
    # the sampling policy and the reference: the same head a little off, so that ratios leave [1 − ε, 1 + ε]
    old = materialised_log_probs(x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64), w, t)[0]
    ref = materialised_log_probs(x, w + 0.2 * torch.randn(w.shape, generator=g, dtype=torch.float64), t)[0]
    # what sits at positions nothing counts is arbitrary (a trainer's padding): it must not matter
    junk = t == -100
    old = torch.where(junk, -5 * torch.rand(old.shape, generator=g, dtype=torch.float64), old)
    ref = torch.where(junk, -5 * torch.rand(ref.shape, generator=g, dtype=torch.float64), ref)
    return [a.to(device) for a in (x.to(dtype), w.to(dtype), t, A, old, ref)]


CASES = ([dict(loss_type=lt, importance_sampling_level=lvl, beta=0.04, epsilon_high=5.0 if lt == "cispo" else 0.28,
               max_completion_length=9) for lt in GRPO_LOSS_TYPES for lvl in IMPORTANCE_SAMPLING_LEVELS]
         + [dict(loss_type="grpo", delta=1.5, epsilon=0.1), dict(loss_type="dapo", num_items_in_batch=40),
            dict(loss_type="bnpo", epsilon=0.1, epsilon_high=0.3, both_clips=True),
            dict(loss_type="grpo", delta=1.1, epsilon_high=0.28),
            dict(loss_type="bnpo", token_advantages=True), dict(loss_type="dapo", on_policy=True),
            dict(loss_type="dapo", temperature=0.7, beta=0.1),
            dict(loss_type="grpo", temperature=0.7, softcap=2.0, beta=0.1)])


def case_id(options):
    return "-".join(f"{k}={v}" for k, v in options.items())


def check_grpo_head_against_trl(options, device="cpu", dtype=torch.float64):
    options = dict(options)
    token_advantages, on_policy = options.pop("token_advantages", False), options.pop("on_policy", False)
    both_clips = options.pop("both_clips", False)
    num_items = options.pop("num_items_in_batch", None)
    temperature = options.get("temperature", 1.0)
    x, w, t, A, old, ref = grpo_case(dtype=dtype, device=device, token_advantages=token_advantages)
    if temperature != 1.0:  # the old and reference log-probabilities at the sampling temperature
        old, ref = old / temperature, ref / temperature
    old = None if on_policy else old
    head = mk.LinearGRPOLoss(**options)
    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = head(xs, ws, t, A, old_log_probs=old, ref_log_probs=ref, num_items_in_batch=num_items)
    gx, gw = torch.autograd.grad(out.loss, (xs, ws))

    want_x, want_w = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    lp, entropy, mask = materialised_log_probs(want_x, want_w, t.cpu(), temperature, options.get("softcap"))
    trl = dict(beta=options.get("beta", 0.0), epsilon_low=options.get("epsilon", 0.2),
               epsilon_high=options.get("epsilon_high") or options.get("epsilon", 0.2), delta=options.get("delta"),
               loss_type=options.get("loss_type", "dapo"),
               importance_sampling_level=options.get("importance_sampling_level", "token"),
               max_completion_length=options.get("max_completion_length"), num_items_in_batch=num_items)
    loss, kl, low, high, region, per_token = trl_grpo(lp, A.double().cpu(), mask.double(),
                                                      None if old is None else old.double().cpu(), ref.double().cpu(),
                                                      **trl)
    want_gx, want_gw = torch.autograd.grad(loss, (want_x, want_w))
    for name, got, want in (("loss", out.loss, loss), ("grad input", gx, want_gx), ("grad weight", gw, want_gw),
                            ("per-token loss", out.per_token_loss, per_token),
                            ("kl", out.kl, kl), ("entropy", out.entropy, (entropy * mask).sum() / mask.sum())):
        assert_close_rel(got.cpu(), want.detach(), dtype, f"{options} {name}", floor=1.0)
    # shares of whole tokens: exact up to the float32 of TRL's .float() flags
    assert torch.allclose(out.clip_ratio_low.cpu().double(), low.double(), atol=1e-6)
    assert torch.allclose(out.clip_ratio_high.cpu().double(), high.double(), atol=1e-6)
    assert torch.allclose(out.clip_ratio_region.cpu().double(), region.double(), atol=1e-6)
    if both_clips:  # the case must clip on both sides, with ε ≠ ε_high
        assert out.clip_ratio_low > 0 and out.clip_ratio_high > 0
    assert not (out.kl.requires_grad or out.entropy.requires_grad or out.clip_ratio_region.requires_grad)
    return out


@pytest.mark.parametrize("options", CASES, ids=case_id)
def test_grpo_head_matches_trl_arithmetic(options):
    out = check_grpo_head_against_trl(options)
    # (δ ≤ 1 + ε_high caps every ratio below the high clip: TRL's flags, taken of the capped ratio, then show none)
    if options.get("loss_type") != "cispo" and not options.get("on_policy") and options.get("delta", 2.0) > 1.3:
        assert out.clip_ratio_region > 0, "the case must clip some tokens"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grpo_head_in_low_precision(dtype):
    for options in (dict(loss_type="dapo", beta=0.04), dict(loss_type="grpo", importance_sampling_level="sequence")):
        check_grpo_head_against_trl(options, dtype=dtype)


def test_clip_shares_of_one_token_completions_count_tokens():
    """Token level with T = 1: the clip shares are over counted tokens, as for any T (the flags' width of 1 alone made
    them a mean over every row, masked ones too: 0.5 here instead of 1; a fuzzing review). The same data padded to
    T = 2 gives the same shares; at sequence level they stay a mean over sequences (TRL's)."""
    lp = torch.tensor([[-1.0], [-1.0]], requires_grad=True)
    old, mask, A = torch.tensor([[-2.0], [-1.0]]), torch.tensor([[True], [False]]), torch.tensor([1.0, 1.0])
    out = mk.grpo_loss(lp, A, mask, old_log_probs=old)
    pad = torch.zeros(2, 1)
    padded = mk.grpo_loss(torch.cat([lp, pad], 1), A, torch.cat([mask, pad.bool()], 1),
                          old_log_probs=torch.cat([old, pad], 1))
    assert out.clip_ratio_high == 1.0 and padded.clip_ratio_high == 1.0 and out.clip_ratio_low == 0.0
    sequence = mk.grpo_loss(lp, A, mask, old_log_probs=old, importance_sampling_level="sequence")
    assert sequence.clip_ratio_high == 0.5  # one of the two sequences (TRL's mean over sequences)


def test_on_policy_step_is_the_policy_gradient():
    """old_log_probs omitted (GRPO's first iteration): the ratio is 1 with gradient ∇log π, so the dapo loss is
    −Σ A·mask / tokens and its gradient that of −Σ A·log π·mask / tokens."""
    x, w, t, A, _, _ = grpo_case()
    lp, mask = mk.log_probs_and_entropy(x, w, t)[0], t != -100
    out = mk.grpo_loss(lp, A, mask)
    assert torch.allclose(out.loss, -(A[:, None] * mask).sum() / mask.sum(), atol=1e-15)
    xs = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(mk.grpo_loss(mk.log_probs_and_entropy(xs, w, t)[0], A, mask).loss, xs)
    lp = mk.log_probs_and_entropy(xs, w, t)[0]
    (want,) = torch.autograd.grad(-(A[:, None] * lp * mask).sum() / mask.sum(), xs)
    assert torch.allclose(gx, want, atol=1e-14)
    assert out.clip_ratio_region == 0 and out.kl == 0 and out.entropy is None


def test_nothing_counted_gives_zero_loss_and_gradients():
    x, w, t, A, old, ref = grpo_case()
    t[:] = -100
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    for loss_type in GRPO_LOSS_TYPES:
        head = mk.LinearGRPOLoss(loss_type=loss_type, beta=0.1, epsilon_high=5.0 if loss_type == "cispo" else None,
                                 max_completion_length=7)
        out = head(xs, ws, t, A, old_log_probs=old, ref_log_probs=ref)
        gx, gw = torch.autograd.grad(out.loss, (xs, ws))
        assert out.loss == 0 and (gx == 0).all() and (gw == 0).all() and out.kl == 0


def test_padding_with_inf_or_nan_changes_nothing():
    """−inf (vLLM-style padding), NaN or huge values at positions the mask leaves out: the loss, the per-token loss,
    the gradients and the metrics equal those with zeros there, at both importance-sampling levels."""
    x, w, t, A, old, ref = grpo_case()
    junk = t == -100
    lp = mk.log_probs_and_entropy(x, w, t)[0]
    for level in IMPORTANCE_SAMPLING_LEVELS:
        for loss_type in ("dapo", "cispo"):
            options = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.1,
                           epsilon_high=5.0 if loss_type == "cispo" else None)
            clean = mk.grpo_loss(lp, A, ~junk, old_log_probs=old.masked_fill(junk, 0), ref_log_probs=ref.masked_fill(
                junk, 0), **options)
            for fill in (-float("inf"), float("nan"), 1e4):
                lps = lp.masked_fill(junk, fill).detach().requires_grad_()
                got = mk.grpo_loss(lps, A, ~junk, old_log_probs=old.masked_fill(junk, fill),
                                   ref_log_probs=ref.masked_fill(junk, -fill), **options)
                (grad,) = torch.autograd.grad(got.loss, lps)
                assert torch.isfinite(grad).all() and (grad[junk] == 0).all()
                for a, b in zip(got[:-1], clean[:-1]):
                    assert torch.equal(a.detach(), b.detach()), (level, loss_type, fill)


def test_empty_batch_and_num_items_in_batch():
    lp = torch.zeros(0, 5, dtype=torch.float64)
    out = mk.grpo_loss(lp, torch.zeros(0, dtype=torch.float64), torch.zeros(0, 5, dtype=torch.bool))
    assert out.loss == 0 and out.per_token_loss.shape == (0, 5)
    x, w, t, A, old, _ = grpo_case()
    lp, mask = mk.log_probs_and_entropy(x, w, t)[0], t != -100
    a = mk.grpo_loss(lp, A, mask, old_log_probs=old, num_items_in_batch=torch.tensor(40))
    b = mk.grpo_loss(lp, A, mask, old_log_probs=old, num_items_in_batch=40)
    assert torch.equal(a.loss, b.loss) and a.loss.dtype == torch.float64


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_reference_model_head_and_shift(softcap):
    """The reference model given as hidden states + head equals its precomputed log-probabilities (and gets no
    gradient; with the head's softcap, the reference's logits are capped too); shift=1 reads token t + 1 at position
    t, the reference's too."""
    x, w, t, A, old, _ = grpo_case()
    xr = torch.randn(5, 7, 9, dtype=torch.float64, requires_grad=True)
    wr = torch.randn(40, 9, dtype=torch.float64, requires_grad=True)
    # the reference at the sampling temperature too (TRL)
    head = mk.LinearGRPOLoss(beta=0.2, temperature=0.7, softcap=softcap)
    ref = materialised_log_probs(xr.detach(), wr.detach(), t, temperature=0.7, softcap=softcap)[0]
    by_head = head(x, w, t, A, old_log_probs=old, ref_input=xr, ref_weight=wr)
    given = head(x, w, t, A, old_log_probs=old, ref_log_probs=ref)
    for a, b in zip(by_head[:-1], given[:-1]):
        assert torch.allclose(a, b, atol=1e-12)
    xs = x.clone().requires_grad_()
    head(xs, w, t, A, old_log_probs=old, ref_input=xr, ref_weight=wr).loss.backward()
    assert xs.grad is not None and xr.grad is None and wr.grad is None
    unshifted = torch.cat([torch.full_like(t[:, :1], 3), t[:, :-1]], 1)
    shifted_t = torch.cat([t[:, :-1], torch.full_like(t[:, :1], -100)], 1)
    old_s = torch.cat([old[:, :-1], torch.zeros_like(old[:, :1])], 1)
    a = mk.LinearGRPOLoss(beta=0.2, temperature=0.7, shift=1, softcap=softcap)(
        x, w, unshifted, A, old_log_probs=old_s, ref_input=xr, ref_weight=wr)
    b = head(x, w, shifted_t, A, old_log_probs=old_s, ref_input=xr, ref_weight=wr)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, atol=1e-12)


def test_bad_arguments_name_what_was_expected():
    x, w, t, A, old, ref = grpo_case()
    lp, mask = mk.log_probs_and_entropy(x, w, t)[0], t != -100
    cases = [
        (lambda: mk.LinearGRPOLoss(loss_type="ppo"), ValueError, "loss_type must be one of"),
        (lambda: mk.LinearGRPOLoss(importance_sampling_level="batch"), ValueError, "importance_sampling_level"),
        (lambda: mk.LinearGRPOLoss(loss_type="cispo"), ValueError, "needs epsilon_high"),
        (lambda: mk.LinearGRPOLoss(loss_type="dr_grpo"), ValueError, "needs max_completion_length"),
        (lambda: mk.LinearGRPOLoss(loss_type="dr_grpo", max_completion_length=0), ValueError,
         "max_completion_length must be ≥ 1"),
        (lambda: mk.LinearGRPOLoss(epsilon=1.0), ValueError, "epsilon must lie"),
        (lambda: mk.LinearGRPOLoss(beta=-0.1), ValueError, "beta must lie"),
        (lambda: mk.LinearGRPOLoss(delta=1.0), ValueError, "delta must lie"),
        (lambda: mk.LinearGRPOLoss(loss_type="cispo", epsilon_high=5.0, delta=2.0), ValueError, "leave delta None"),
        (lambda: mk.grpo_loss(lp, A, mask, num_items_in_batch=0), ValueError, "num_items_in_batch must lie"),
        (lambda: mk.grpo_loss(lp, A, mask, num_items_in_batch="40"), TypeError, "num_items_in_batch must be a real"),
        (lambda: mk.grpo_loss(lp, A, mask, num_items_in_batch=torch.ones(2)), ValueError, "one-element tensor"),
        (lambda: mk.grpo_loss(lp, A, mask, loss_type="grpo", num_items_in_batch=40), ValueError,
         "normaliser of loss_type 'dapo' and 'cispo'"),
        (lambda: mk.LinearGRPOLoss(temperature=0.0), ValueError, "temperature must lie"),
        (lambda: mk.LinearGRPOLoss(softcap=0.0), ValueError, "softcap must lie"),
        (lambda: mk.grpo_loss(lp, A, mask, beta=0.1), ValueError, "needs ref_log_probs"),
        (lambda: mk.grpo_loss(lp, A[:3], mask), ValueError, "advantages must have shape"),
        (lambda: mk.grpo_loss(lp, A, mask[:, 1:]), ValueError, "mask must be"),
        (lambda: mk.grpo_loss(lp, A, mask, old_log_probs=old[:, 1:]), ValueError, "old_log_probs must match"),
        (lambda: mk.grpo_loss(lp[0], A, mask), ValueError, "log_probs must be 2-D"),
        (lambda: mk.LinearGRPOLoss()(x[0], w, t[0], A), ValueError, r"input must have shape \(B, T, D\)"),
        (lambda: mk.LinearGRPOLoss()(x, w, t, A, ref_input=x), ValueError, "ref_input and ref_weight"),
        (lambda: mk.LinearGRPOLoss()(x, w, t, A, ref_input=x, ref_weight=w, ref_log_probs=ref), ValueError,
         "one of the two"),
        (lambda: mk.LinearGRPOLoss()(x, w, t, A, ref_input=x[:, 1:], ref_weight=w), ValueError,
         "ref_input must have shape"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_compile_fullgraph():
    x, w, t, A, old, ref = grpo_case(dtype=torch.float32)
    old, ref = old.float(), ref.float()
    head = mk.LinearGRPOLoss(beta=0.04, importance_sampling_level="sequence")
    eager = head(x, w, t, A.float(), old_log_probs=old, ref_log_probs=ref)
    compiled = torch.compile(head, fullgraph=True)(x, w, t, A.float(), old_log_probs=old, ref_log_probs=ref)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
