"""Preference losses on an LM head (marginkern.preference): DPO and its variants, ORPO, CPO/SimPO, KTO.

The oracle is TRL's arithmetic on the full float64 logits (its concatenated forward: log_softmax, gather, masked
sum or mean; then the trainer's loss formula), transcribed below in TRL's own terms. Known values at a point
check each formula independently of that transcription.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern.engine import log1m_exp
from marginkern.preference import CPO_LOSS_TYPES, DPO_LOSS_TYPES
from tests.helpers import assert_close_rel


def trl_logps(x, w, t, ignore_index=-100, average=False, softcap=None):
    """TRL's get_batch_logps on materialised float64 logits (Gemma's softcap·tanh(z/softcap) where given): (B,) sums
    (or means) of the counted tokens' log p, the (B, T) per-token log p, the mask and the logits."""
    logits = x.double() @ w.double().t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    mask = t != ignore_index
    per_token = torch.gather(logits.log_softmax(-1), 2, torch.where(mask, t, 0)[..., None])[..., 0]
    total = (per_token * mask).sum(-1)
    return (total / mask.sum(-1) if average else total), per_token, mask, logits


def trl_dpo_losses(pc, pr, rc, rr, beta, loss_type, ls, tau=0.05):
    """DPOTrainer.dpo_loss's branches."""
    logits = (pc - pr) - (rc - rr)
    cr, rr_ = pc - rc, pr - rr
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    if loss_type == "robust":
        return (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    if loss_type == "exo_pair":
        ls = ls or 1e-3
        return ((beta * logits).sigmoid() * (F.logsigmoid(beta * logits) - math.log(1 - ls))
                + (-beta * logits).sigmoid() * (F.logsigmoid(-beta * logits) - math.log(ls)))
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "nca_pair":
        return -F.logsigmoid(cr * beta) - 0.5 * F.logsigmoid(-cr * beta) - 0.5 * F.logsigmoid(-rr_ * beta)
    if loss_type == "sppo_hard":
        return (cr - 0.5 / beta) ** 2 + (rr_ + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_pair"):
        a, b = (pc - pr, rc - rr) if loss_type == "aot" else (cr, rr_)
        delta = torch.sort(a, dim=0)[0] - torch.sort(b, dim=0)[0]
        return -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
    if loss_type == "apo_zero":
        return (1 - F.sigmoid(beta * cr)) + F.sigmoid(beta * rr_)
    if loss_type == "apo_down":
        return F.sigmoid(beta * cr) + (1 - F.sigmoid(beta * (cr - rr_)))
    assert loss_type == "discopop"
    logits = logits * beta
    modulation = torch.sigmoid(logits / tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def trl_cpo_losses(pc, pr, beta, loss_type, ls, simpo_gamma):
    """CPOTrainer.cpo_loss's branches."""
    logits = pc - pr
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        return -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    return (logits - 1 / (2 * beta)) ** 2


def trl_ld_logps(per_token, mask, ld_alpha):
    """DPOTrainer.concatenated_forward's LD-DPO branch as the paper defines it (l_p counted from the completion's
    first token): applied to each sequence's counted tokens moved to the front. TRL applies it to the positions of
    prompt + completion, which this does not reproduce when a prompt precedes the completion."""
    flushed = torch.zeros_like(per_token)
    for row in range(per_token.shape[0]):
        kept = per_token[row][mask[row]]
        flushed[row, :kept.shape[0]] = kept
    completion_lengths = mask.sum(dim=1)
    num_examples = per_token.shape[0] // 2
    public_lengths = torch.min(completion_lengths[:num_examples], completion_lengths[num_examples:])
    public_lengths = torch.cat([public_lengths, public_lengths], dim=0)
    position_ids = torch.arange(per_token.shape[1]).expand_as(per_token)
    ld_mask = position_ids < public_lengths.unsqueeze(1)
    in_completion = position_ids < completion_lengths.unsqueeze(1)
    front = (flushed * (ld_mask & in_completion)).sum(dim=1)
    rear = (flushed * (~ld_mask & in_completion)).sum(dim=1)
    return front + ld_alpha * rear


def trl_wpo_weights(logits, per_token, mask):
    """DPOTrainer.concatenated_forward's use_weighting branch (WPO)."""
    logprobs = F.log_softmax(logits, dim=-1)
    adjusted = per_token - torch.logsumexp(2 * logprobs, dim=-1)
    all_weights = (adjusted * mask).sum(-1) / mask.sum(-1)
    num_examples = per_token.shape[0] // 2
    return torch.clamp(torch.exp(all_weights[:num_examples] + all_weights[num_examples:]), max=1)


def pair_case(B=3, T=9, D=12, V=40, dtype=torch.float64, seed=0, device="cpu"):
    """2B sequences (chosen then rejected) whose first 2 positions are the prompt (ignored), a padded tail on one
    sequence, and a reference model of another width."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * B, T, D, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    t = torch.randint(0, V, (2 * B, T), generator=g)
    t[:, :2] = -100
    t[1, -3:] = -100
    xr = torch.randn(2 * B, T, D + 4, generator=g, dtype=torch.float64).to(dtype)
    wr = (torch.randn(V, D + 4, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    return [a.to(device) for a in (x, w, t, xr, wr)]


def head_and_oracle(kind, **options):
    """(our module, TRL's loss on (x, w, t, xr, wr) with its NLL and averaging rules)."""
    beta, softcap = options.get("beta", 0.1), options.get("softcap")
    if kind == "dpo":
        loss_type, ls = options.get("loss_type", "sigmoid"), options.get("label_smoothing", 0.0)
        rpo_alpha = options.get("rpo_alpha", 0.0)
        average = loss_type == "ipo"
        ld_alpha, use_weighting = options.get("ld_alpha"), options.get("use_weighting", False)

        def oracle(x, w, t, xr, wr):
            lp, per_token, mask, logits = trl_logps(x, w, t, average=average, softcap=softcap)
            ref = trl_logps(xr, wr, t, average=average, softcap=softcap)[0]
            B = x.shape[0] // 2
            if ld_alpha is not None:
                lp = trl_ld_logps(per_token, mask, ld_alpha)
            losses = trl_dpo_losses(lp[:B], lp[B:], ref[:B], ref[B:], beta, loss_type, ls,
                                    options.get("discopop_tau", 0.05))
            nll = -(per_token[:B] * mask[:B]).sum() / mask[:B].sum()
            if use_weighting:  # TRL: ((losses + rpo_alpha·nll)·policy_weights).mean()
                weights = trl_wpo_weights(logits.detach(), per_token.detach(), mask)
                return (((losses + rpo_alpha * nll) * weights).mean(), lp, nll, beta * (lp[:B] - ref[:B]),
                        beta * (lp[B:] - ref[B:]), losses * weights)
            return (losses.mean() + rpo_alpha * nll, lp, nll, beta * (lp[:B] - ref[:B]), beta * (lp[B:] - ref[B:]),
                    losses)
        return mk.LinearDPOLoss(**options), oracle
    if kind == "orpo":
        def oracle(x, w, t, xr, wr):
            lp, per_token, mask, _ = trl_logps(x, w, t, average=True, softcap=softcap)
            B = x.shape[0] // 2
            pc, pr = lp[:B], lp[B:]
            log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
            nll = -(per_token[:B] * mask[:B]).sum() / mask[:B].sum()
            losses = -beta * F.logsigmoid(log_odds)
            return nll + losses.mean(), lp, nll, beta * pc, beta * pr, losses
        return mk.LinearORPOLoss(**options), oracle
    loss_type = "simpo" if kind == "simpo" else options.get("loss_type", "sigmoid")
    gamma = options.get("gamma" if kind == "simpo" else "simpo_gamma", 0.5)
    beta = options.get("beta", 2.0 if kind == "simpo" else 0.1)
    alpha = options.get("alpha", 0.0 if kind == "simpo" else 1.0)
    ls = options.get("label_smoothing", 0.0)

    def oracle(x, w, t, xr, wr):
        lp, per_token, mask, _ = trl_logps(x, w, t, average=loss_type in ("ipo", "simpo"), softcap=softcap)
        B = x.shape[0] // 2
        losses = trl_cpo_losses(lp[:B], lp[B:], beta, loss_type, ls, gamma)
        nll = -(per_token[:B] * mask[:B]).sum() / mask[:B].sum()
        return losses.mean() + alpha * nll, lp, nll, beta * lp[:B], beta * lp[B:], losses
    return (mk.LinearSimPOLoss if kind == "simpo" else mk.LinearCPOLoss)(**options), oracle


PAIRED_CASES = ([("dpo", dict(loss_type=lt)) for lt in DPO_LOSS_TYPES]
                + [("dpo", dict(loss_type="sigmoid", label_smoothing=0.2, rpo_alpha=0.7, beta=0.5)),
                   ("dpo", dict(loss_type="robust", label_smoothing=0.1)),
                   ("dpo", dict(loss_type="exo_pair", label_smoothing=0.05)),
                   ("dpo", dict(loss_type="aot", label_smoothing=0.1)),
                   ("dpo", dict(loss_type="aot_pair", label_smoothing=0.1)),
                   ("dpo", dict(loss_type="discopop", discopop_tau=0.5, beta=0.3)),
                   ("dpo", dict(ld_alpha=0.4)), ("dpo", dict(use_weighting=True, rpo_alpha=0.6)),
                   ("dpo", dict(loss_type="hinge", ld_alpha=0.0, use_weighting=True)),
                   ("orpo", dict()), ("orpo", dict(beta=0.25))]
                + [("cpo", dict(loss_type=lt)) for lt in CPO_LOSS_TYPES]
                + [("cpo", dict(loss_type="sigmoid", label_smoothing=0.1, alpha=0.0)),
                   ("cpo", dict(loss_type="simpo", label_smoothing=0.1, simpo_gamma=0.3)),
                   ("simpo", dict()), ("simpo", dict(beta=2.5, gamma=1.2, alpha=0.5, label_smoothing=0.2))]
                # Gemma's final-logit softcap (2: it bites on these logits), through WPO's pass and the logit means
                + [("dpo", dict(softcap=2.0)), ("dpo", dict(use_weighting=True, rpo_alpha=0.3, softcap=2.0)),
                   ("orpo", dict(softcap=2.0)), ("cpo", dict(loss_type="ipo", softcap=2.0)),
                   ("simpo", dict(softcap=2.0))])


def case_id(case):
    kind, options = case
    return kind + "".join(f"-{k}={v}" for k, v in options.items())


def check_paired_head_against_trl(kind, options, device="cpu", dtype=torch.float64, uses_ref_input=True, shift=0):
    """Our head (ops on `device`) against TRL's arithmetic in float64 on the same rounded inputs: the loss, its
    gradients for input and weight, the per-pair losses, the log-probabilities, the NLL, the rewards and the logit
    means. shift=1: the head gets the labels unshifted (a causal LM's), the oracle them shifted."""
    head, oracle = head_and_oracle(kind, **dict(options, shift=shift) if shift else options)
    x, w, t, xr, wr = pair_case(dtype=dtype, device=device)
    head_target = t
    if shift:  # the head reads label i + 1 at position i: give it the labels one position later
        head_target = torch.cat([torch.full_like(t[:, :1], 5), t[:, :-1]], 1)
        t = torch.cat([t[:, :-1], torch.full_like(t[:, :1], -100)], 1)
    B = x.shape[0] // 2
    want_x, want_w = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    want_loss, want_lp, want_nll, want_cr, want_rr, want_losses = oracle(want_x, want_w, t.cpu(), xr.double().cpu(),
                                                                         wr.double().cpu())
    want_gx, want_gw = torch.autograd.grad(want_loss, (want_x, want_w))
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    ref = {}
    if kind == "dpo":
        if uses_ref_input:
            ref = dict(ref_input=xr, ref_weight=wr)
        else:
            ref_lp = trl_logps(xr.double().cpu(), wr.double().cpu(), t.cpu(), average=head.average,
                               softcap=options.get("softcap"))[0]
            ref = dict(ref_chosen_logps=ref_lp[:B].to(device), ref_rejected_logps=ref_lp[B:].to(device))
    out = head(x, w, head_target, **ref)
    gx, gw = torch.autograd.grad(out.loss, (x, w))
    # relative to the largest loss term: sppo_hard and ipo sum squares of 1/(2β) = 5 and their loss is ~100
    for name, got, want in (("loss", out.loss, want_loss), ("grad input", gx, want_gx), ("grad weight", gw, want_gw),
                            ("pair losses", out.pair_losses, want_losses),
                            ("chosen_logps", out.chosen_logps, want_lp[:B]),
                            ("rejected_logps", out.rejected_logps, want_lp[B:]), ("nll", out.nll_loss, want_nll),
                            ("chosen_rewards", out.chosen_rewards, want_cr),
                            ("rejected_rewards", out.rejected_rewards, want_rr)):
        assert_close_rel(got.cpu(), want.detach(), dtype, f"{kind} {options} {name}", floor=1.0)
    logits = trl_logps(x.detach().double().cpu(), w.detach().double().cpu(), t.cpu(),
                       softcap=options.get("softcap"))[3]
    mask = (t != -100).cpu()
    for got, half in ((out.chosen_logits_mean, slice(0, B)), (out.rejected_logits_mean, slice(B, 2 * B))):
        want = logits[half][mask[half]].mean()
        assert_close_rel(got.cpu(), want, dtype, f"{kind} logits mean", floor=1.0)
    assert not (out.chosen_rewards.requires_grad or out.chosen_logits_mean.requires_grad)


@pytest.mark.parametrize("case", PAIRED_CASES, ids=case_id)
def test_paired_heads_match_trl_arithmetic(case):
    check_paired_head_against_trl(*case)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_precomputed_reference_equals_reference_model(loss_type):
    check_paired_head_against_trl("dpo", dict(loss_type=loss_type), uses_ref_input=False)


@pytest.mark.parametrize("case", [("dpo", dict(loss_type="ipo", rpo_alpha=0.5)), ("orpo", dict()),
                                  ("simpo", dict(alpha=1.0))], ids=case_id)
def test_paired_heads_with_shifted_labels(case):
    """shift=1 (a causal LM's labels as they come): the policy's and the reference model's log-probabilities, the NLL
    and the logit means all read label i + 1 at position i."""
    check_paired_head_against_trl(*case, shift=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paired_heads_in_low_precision(dtype):
    """fp32 and bf16 inputs through the CPU kernels: within the dtype's tolerance of float64 TRL on the rounded
    inputs."""
    for case in (("dpo", dict(loss_type="sigmoid", rpo_alpha=1.0)), ("orpo", dict()), ("simpo", dict())):
        check_paired_head_against_trl(*case, dtype=dtype)


def test_sequence_log_probs_sum_mean_shift_and_empty_sequences():
    """Sums and means of the counted tokens' log p, with the targets shifted (shift=1 reads labels as a causal LM
    gives them), and a sequence without counted tokens: 0 for both (TRL's mean is 0/0 there)."""
    x, w, t, _, _ = pair_case()
    t[2] = -100
    for average in (False, True):
        got = mk.sequence_log_probs(x, w, t, average=average)
        lp, per_token, mask, _ = trl_logps(x, w, t)
        want = (per_token * mask).sum(-1) / (mask.sum(-1).clamp_min(1) if average else 1)
        assert torch.allclose(got, want, atol=1e-12) and got[2] == 0
        shifted = torch.cat([t[:, 1:], torch.full_like(t[:, :1], -100)], 1)
        got = mk.sequence_log_probs(x, w, t, average=average, shift=1)
        assert torch.allclose(got, mk.sequence_log_probs(x, w, shifted, average=average), atol=1e-12)


def test_ld_dpo_and_wpo_options():
    """LD-DPO's public length is per pair (the shorter completion's token count): a pair of equal lengths is
    unchanged, ld_alpha = 1 is plain DPO; WPO's weights are detached, in (0, 1], and None without use_weighting."""
    x, w, t, xr, wr = pair_case()
    ref = dict(ref_input=xr, ref_weight=wr)
    plain = mk.LinearDPOLoss()(x, w, t, **ref)
    ld = mk.LinearDPOLoss(ld_alpha=0.4)(x, w, t, **ref)
    assert plain.policy_weights is None
    # sequence 1 (a chosen one) has 3 fewer counted tokens: only its pair's rejected sequence is cut
    torch.testing.assert_close(ld.chosen_logps, plain.chosen_logps)
    torch.testing.assert_close(ld.rejected_logps[[0, 2]], plain.rejected_logps[[0, 2]])
    assert (ld.rejected_logps[1] - plain.rejected_logps[1]).abs() > 1.0
    one = mk.LinearDPOLoss(ld_alpha=1.0)(x, w, t, **ref)
    torch.testing.assert_close(one.loss, plain.loss)
    head = mk.LinearDPOLoss(use_weighting=True, ld_alpha=0.25)
    weighted = head(x.requires_grad_(), w, t, **ref)
    assert not weighted.policy_weights.requires_grad and weighted.loss.requires_grad
    assert ((weighted.policy_weights > 0) & (weighted.policy_weights <= 1)).all()
    assert "ld_alpha=0.25, use_weighting=True" in repr(head)


def test_dpo_known_values_at_zero_margin():
    """Every DPO loss type at π = ref (h = c = r = 0), from its paper's formula by hand: an independent check of
    each branch (β = 0.25, ε = 0.1 where the type takes one)."""
    zeros = torch.zeros(4, dtype=torch.float64)
    beta, eps, log2 = 0.25, 0.1, math.log(2.0)
    want = {"sigmoid": log2, "robust": log2, "exo_pair": -log2 - 0.5 * (math.log(1 - eps) + math.log(eps)),
            "hinge": 1.0, "ipo": 1 / (4 * beta ** 2), "nca_pair": 2 * log2, "sppo_hard": 2 * (0.5 / beta) ** 2,
            "aot": log2, "aot_pair": log2, "apo_zero": 1.0, "apo_down": 1.0, "discopop": 0.5 * (log2 + 1)}
    for loss_type, value in want.items():
        eps_here = eps if loss_type in ("sigmoid", "robust", "exo_pair", "aot", "aot_pair") else 0.0
        losses, cr, rr = mk.dpo_loss(zeros, zeros, zeros, zeros, beta=beta, loss_type=loss_type,
                                     label_smoothing=eps_here)
        assert torch.allclose(losses, torch.full_like(losses, value), atol=1e-14), loss_type
        assert (cr == 0).all() and (rr == 0).all()
    # the reward margin moves each loss in the right direction: better chosen log-ratio, lower loss
    up = torch.full((4,), 2.0, dtype=torch.float64)
    for loss_type in ("sigmoid", "robust", "hinge", "nca_pair", "aot", "aot_pair", "apo_zero", "discopop"):
        at_zero = mk.dpo_loss(zeros, zeros, zeros, zeros, beta=beta, loss_type=loss_type)[0]
        better = mk.dpo_loss(up, zeros, zeros, zeros, beta=beta, loss_type=loss_type)[0]
        assert (better < at_zero).all(), loss_type


def test_cpo_simpo_orpo_kto_known_values():
    log2 = math.log(2.0)
    z = torch.zeros(3, dtype=torch.float64)
    assert torch.allclose(mk.cpo_loss(z, z, loss_type="sigmoid")[0], z + log2)
    assert torch.allclose(mk.cpo_loss(z, z, loss_type="hinge")[0], z + 1)
    assert torch.allclose(mk.cpo_loss(z, z, beta=0.5, loss_type="ipo")[0], z + 1)
    # SimPO: −log σ(β·Δ − γ) with Δ = γ/β is log 2
    assert torch.allclose(mk.cpo_loss(z + 0.25, z, beta=2.0, loss_type="simpo", simpo_gamma=0.5)[0], z + log2)
    # ORPO at p_c = p_r: log odds 0, loss β·log 2; at p_c = 1/2, p_r = 1/3: odds 1 and 1/2
    half = torch.full((3,), math.log(0.5), dtype=torch.float64)
    third = torch.full((3,), math.log(1 / 3), dtype=torch.float64)
    assert torch.allclose(mk.orpo_loss(half, half, beta=0.5)[0], z + 0.5 * log2)
    losses, _, _, log_odds = mk.orpo_loss(half, third, beta=1.0)
    assert torch.allclose(log_odds, z + log2) and torch.allclose(losses, z - math.log(2 / 3))
    # a log p that rounds to exactly 0 (S′ below float32's range): the odds stay finite, equal ones give β·log 2,
    # and the gradient is its limit as log p → 0⁻, −β·odds(rejected) (here p_r = 1/3: odds 1/2)
    zero = torch.zeros(3, requires_grad=True)
    losses, _, _, log_odds = mk.orpo_loss(zero, torch.zeros(3), beta=0.5)
    assert torch.allclose(losses, torch.full((3,), 0.5 * log2)) and (log_odds == 0).all()
    losses, _, _, _ = mk.orpo_loss(zero, third.float(), beta=0.5)
    losses.sum().backward()
    assert torch.allclose(zero.grad, torch.full((3,), -0.5 * 0.5), rtol=1e-5)
    # a slightly positive log p (z_t − lse can round to +ulp) counts as certain, as 0 does
    assert torch.equal(mk.orpo_loss(z + 1e-7, z - 1)[0], mk.orpo_loss(z, z - 1)[0])
    # −inf (a token of probability 0): the odds are 0, the loss finite or +inf as the formula says, never NaN
    inf = torch.full((3,), -float("inf"), dtype=torch.float64)
    assert torch.equal(mk.orpo_loss(z - 1, inf)[0], z) and torch.isinf(mk.orpo_loss(inf, z - 1)[0]).all()
    # with log p = 0 and a rejected p of 1e-6, the gradient's limit −β·odds(p_r) ≈ −β·1e-6 needs σ(−log odds) ≈
    # 1e-30·1e-6 to be a normal float32 (MAX_LOG_PROB = −1e-30; at −1.2e-38 it would be a denormal of a few bits)
    zero32 = torch.zeros(2, requires_grad=True)
    mk.orpo_loss(zero32, torch.full((2,), math.log(1e-6)), beta=1.0)[0].sum().backward()
    assert torch.allclose(zero32.grad, torch.full((2,), -1e-6 / (1 - 1e-6)), rtol=1e-4)
    # KTO at r = z₀: 1 − σ(0) = ½ for either kind, times its weight
    desirable = torch.tensor([True, False, True])
    losses, rewards = mk.kto_loss(z + 0.3, z, desirable, kl=0.3, desirable_weight=2.0, undesirable_weight=0.5)
    assert torch.allclose(losses, torch.tensor([1.0, 0.25, 1.0], dtype=torch.float64))
    assert torch.allclose(rewards, z + 0.03)
    # discopop far on the wrong side (βh = −200): TRL's e^{−βh}·σ(βh/τ) is inf·0 = NaN there
    zf = z.float()
    losses = mk.dpo_loss(zf - 2000, zf, beta=0.1, loss_type="discopop")[0]
    assert torch.isfinite(losses).all() and torch.allclose(losses, zf + 200, rtol=1e-6)


def test_reference_and_kl_inputs_get_no_gradient():
    """Precomputed reference log-probabilities and KTO's reference point are constants of the loss, whatever their
    requires_grad (TRL detaches them)."""
    x, w, t, xr, wr = pair_case()
    x.requires_grad_()
    ref_c, ref_r = torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                                                         requires_grad=True)
    mk.LinearDPOLoss()(x, w, t, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r).loss.backward()
    assert ref_c.grad is None and ref_r.grad is None
    policy_kl, ref_kl = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    kl = mk.kto_kl_estimate(policy_kl, ref_kl)
    assert not kl.requires_grad
    ref_logps = torch.randn(6, dtype=torch.float64, requires_grad=True)
    mk.LinearKTOLoss()(x, w, t, torch.ones(6, dtype=torch.bool), ref_logps=ref_logps, kl=policy_kl.mean()).loss.backward()
    assert ref_logps.grad is None and policy_kl.grad is None


def test_orpo_on_near_certain_completions_is_exact():
    check_orpo_near_certain_completions("cpu")


def check_orpo_near_certain_completions(device):
    """Completions whose every token has p ≈ 1 − 1e-11 (a confident model on short answers, TRL #2564): float32
    log_softmax rounds their log p to 0 and TRL's log1p(−exp(·)) turns the loss into NaN. Here log p comes from
    the kernels' −log1p(S′) and log(1 − p) from log1m_exp: loss and gradients match an exact float64 oracle
    (log p_t = −log1p(Σ_{j≠t} e^{z_j − z_t}); float64 log_softmax itself is 1e-3 off here: z_t − lse carries
    ulp(lse) ≈ 3e-14 against log p ≈ 4e-11, and ORPO's gradient scales with 1/log p)."""
    V, D, B, T = 8, 4, 2, 3
    w = torch.zeros(V, D)
    w[:, 0] = torch.arange(V, dtype=torch.float32)          # the logit of class j is j·x₀: class 7 leads by x₀
    x = torch.zeros(2 * B, T, D)
    x[..., 0] = torch.tensor([24.0, 26.0, 23.0, 25.0])[:, None]
    t = torch.full((2 * B, T), V - 1)
    trl_mean = (x @ w.t()).log_softmax(-1)[..., V - 1].mean(-1)   # TRL's float32 pipeline
    assert (trl_mean == 0).all(), "the case must round log p to 0 in float32"
    assert torch.isnan((trl_mean[:B] - trl_mean[B:]) - (torch.log1p(-torch.exp(trl_mean[:B]))
                                                        - torch.log1p(-torch.exp(trl_mean[B:])))).all()

    def exact_orpo(x, w):
        z = x.double() @ w.double().t()
        others = torch.cat([z[..., :V - 1], z[..., V:]], -1) - z[..., V - 1:V]
        mean = -torch.log1p(others.exp().sum(-1)).mean(-1)
        nll = -mean[:B].mean()
        log_odds = (mean[:B] - mean[B:]) - (torch.log(-torch.expm1(mean[:B])) - torch.log(-torch.expm1(mean[B:])))
        return nll - (0.1 * F.logsigmoid(log_odds)).mean()

    xs, ws = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    loss = mk.LinearORPOLoss()(xs, ws, t.to(device)).loss
    gx, gw = torch.autograd.grad(loss, (xs, ws))
    want_x, want_w = x.double().requires_grad_(), w.double().requires_grad_()
    want = exact_orpo(want_x, want_w)
    want_gx, want_gw = torch.autograd.grad(want, (want_x, want_w))
    for got, exp in ((loss, want), (gx, want_gx), (gw, want_gw)):
        assert torch.isfinite(got).all()
        assert torch.allclose(got.double().cpu(), exp, rtol=1e-5, atol=1e-12), (got, exp)


def test_log1m_exp_is_exact_and_its_gradient_finite():
    """log(1 − e^v) in float32 against float64 across the branch point −log 2, from −80 up to −1e-30; the gradient
    finite everywhere below 0 (torch.where's unused branch must not be NaN)."""
    v = -torch.logspace(-30, math.log10(80.0), 400, dtype=torch.float64).float().double()  # e^-80: a normal float32
    got = log1m_exp(v.float())
    mpmath = pytest.importorskip("mpmath")  # torch's sympy brings it
    with mpmath.workdps(60):
        want = torch.tensor([float(mpmath.log(-mpmath.expm1(mpmath.mpf(float(a))))) for a in v], dtype=torch.float64)
    assert torch.allclose(got.double(), want, rtol=2e-6, atol=0)
    vf = v.float().requires_grad_()
    log1m_exp(vf).sum().backward()
    assert torch.isfinite(vf.grad).all()
    assert torch.allclose(vf.grad.double(), -1 / torch.expm1(-v), rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_kto_head_matches_trl_arithmetic(softcap):
    x, w, t, xr, wr = pair_case(B=3)
    desirable = torch.tensor([True, False, True, True, False, False])
    head = mk.LinearKTOLoss(beta=0.3, desirable_weight=1.5, undesirable_weight=0.8, softcap=softcap)
    kl = mk.kto_kl_estimate(mk.sequence_log_probs(x.flip(0), w, t, softcap=softcap),
                            mk.sequence_log_probs(xr.flip(0), wr, t, softcap=softcap))
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = head(xs, ws, t, desirable, ref_input=xr, ref_weight=wr, kl=kl)
    gx, gw = torch.autograd.grad(out.loss, (xs, ws))
    want_x, want_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    lp = trl_logps(want_x, want_w, t, softcap=softcap)[0]
    ref = trl_logps(xr, wr, t, softcap=softcap)[0]
    kl_want = (trl_logps(x.flip(0), w, t, softcap=softcap)[0]
               - trl_logps(xr.flip(0), wr, t, softcap=softcap)[0]).mean().clamp(min=0)
    assert torch.allclose(kl, kl_want, atol=1e-12)
    chosen = 1 - F.sigmoid(0.3 * ((lp - ref)[desirable] - kl_want))
    rejected = 1 - F.sigmoid(0.3 * (kl_want - (lp - ref)[~desirable]))
    want = torch.cat((1.5 * chosen, 0.8 * rejected), 0).nanmean()
    want_gx, want_gw = torch.autograd.grad(want, (want_x, want_w))
    for got, exp in ((out.loss, want), (gx, want_gx), (gw, want_gw), (out.logps, lp.detach()),
                     (out.rewards, 0.3 * (lp - ref).detach())):
        assert torch.allclose(got, exp, atol=1e-11)
    logits = trl_logps(x, w, t, softcap=softcap)[3]
    # (with a softcap the mean is lse − label-smoothed CE: to the resolution of lse)
    assert torch.allclose(out.logits_mean, logits[t != -100].mean(), atol=1e-12 if softcap is None else 1e-10)
    same = head(x, w, t, desirable, ref_logps=ref, kl=float(kl))
    assert torch.allclose(same.loss, out.loss, atol=1e-14)
    # shift=1 with a causal LM's labels: the policy's and the reference's log-probabilities read label i + 1
    unshifted = torch.cat([torch.full_like(t[:, :1], 5), t[:, :-1]], 1)
    shifted = mk.LinearKTOLoss(beta=0.3, desirable_weight=1.5, undesirable_weight=0.8, shift=1, softcap=softcap)(
        x, w, unshifted, desirable, ref_input=xr, ref_weight=wr, kl=kl)
    plain = head(x, w, torch.cat([t[:, :-1], torch.full_like(t[:, :1], -100)], 1), desirable, ref_input=xr,
                 ref_weight=wr, kl=kl)
    for a, b in zip(shifted, plain):
        assert torch.allclose(a, b, atol=1e-12)


def test_reference_model_gets_no_gradient_and_reference_free_dpo():
    x, w, t, xr, wr = pair_case()
    for a in (x, w, xr, wr):
        a.requires_grad_()
    out = mk.LinearDPOLoss()(x, w, t, ref_input=xr, ref_weight=wr)
    out.loss.backward()
    assert x.grad is not None and w.grad is not None and xr.grad is None and wr.grad is None
    free = mk.LinearDPOLoss(reference_free=True)(x, w, t)
    zeros = torch.zeros(x.shape[0] // 2, dtype=torch.float64)
    explicit = mk.LinearDPOLoss()(x, w, t, ref_chosen_logps=zeros, ref_rejected_logps=zeros)
    assert torch.equal(free.loss, explicit.loss)


def test_bad_arguments_name_what_was_expected():
    x, w, t, xr, wr = pair_case()
    dpo = mk.LinearDPOLoss()
    cases = [
        (lambda: dpo(x[:5], w, t[:5], ref_input=xr[:5], ref_weight=wr), ValueError, "2B"),
        (lambda: dpo(x[:, 0], w, t[:, 0]), ValueError, r"\(2B, T, D\)"),
        (lambda: dpo(x, w, t), ValueError, "reference_free=True"),
        (lambda: dpo(x, w, t, ref_input=xr), ValueError, "ref_input and ref_weight"),
        (lambda: dpo(x, w, t, ref_input=xr, ref_weight=wr, ref_chosen_logps=t[:3, 0].double(),
                     ref_rejected_logps=t[3:, 0].double()), ValueError, "not both"),
        (lambda: dpo(x, w, t, ref_input=xr[:, 1:], ref_weight=wr), ValueError, "ref_input must have shape"),
        (lambda: dpo(x, w, t, ref_chosen_logps=torch.zeros(2, dtype=torch.float64),
                     ref_rejected_logps=torch.zeros(3, dtype=torch.float64)), ValueError, "ref_chosen_logps must match"),
        (lambda: mk.LinearORPOLoss()(x, w, t, ref_input=xr, ref_weight=wr), ValueError, "no reference model"),
        (lambda: mk.LinearDPOLoss(loss_type="kto"), ValueError, "loss_type must be one of"),
        (lambda: mk.LinearDPOLoss(loss_type="hinge", label_smoothing=0.1), ValueError, "label_smoothing applies"),
        (lambda: mk.LinearDPOLoss(loss_type="robust", label_smoothing=0.5), ValueError,
         r"label_smoothing must lie in \[0.0, 0.5\)"),
        (lambda: mk.LinearDPOLoss(label_smoothing=0.6), ValueError, "label_smoothing must lie"),
        (lambda: mk.LinearDPOLoss(beta=0.0), ValueError, "beta must lie"),
        (lambda: mk.LinearDPOLoss(softcap=-1.0), ValueError, "softcap must lie"),
        (lambda: mk.LinearKTOLoss(softcap=float("nan")), ValueError, "softcap must be a finite"),
        (lambda: mk.LinearDPOLoss(ld_alpha=1.5), ValueError, "ld_alpha must lie"),
        (lambda: mk.LinearDPOLoss(loss_type="ipo", ld_alpha=0.5), ValueError, "ld_alpha weights the tokens"),
        (lambda: mk.LinearDPOLoss(use_weighting="yes"), (TypeError, ValueError), "use_weighting"),
        (lambda: mk.LinearCPOLoss(loss_type="robust"), ValueError, "loss_type must be one of"),
        (lambda: mk.LinearSimPOLoss(gamma=float("nan")), ValueError, "^gamma must be a finite"),
        (lambda: mk.LinearCPOLoss(simpo_gamma=float("nan")), ValueError, "^simpo_gamma must be a finite"),
        (lambda: mk.LinearDPOLoss(rpo_alpha=float("inf")), ValueError, "rpo_alpha must be a finite"),
        (lambda: mk.LinearDPOLoss(rpo_alpha=-0.1), ValueError, "rpo_alpha must lie"),
        (lambda: mk.LinearCPOLoss(alpha="1"), TypeError, "alpha must be a real number"),
        (lambda: mk.LinearDPOLoss(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau must lie"),
        (lambda: mk.LinearDPOLoss(reference_free=True)(x, w, t, ref_input=xr, ref_weight=wr), ValueError,
         "reference_free=True, got reference arguments"),
        (lambda: dpo(x, w, t, ref_chosen_logps=[0.0] * 3, ref_rejected_logps=[0.0] * 3), TypeError,
         "ref_chosen_logps must be a torch.Tensor"),
        (lambda: mk.LinearKTOLoss()(x, w, t, torch.ones(6, dtype=torch.bool), ref_logps=[0.0] * 6), TypeError,
         "ref_logps must be a torch.Tensor"),
        (lambda: mk.LinearKTOLoss()(x, w, t, torch.ones(6, dtype=torch.bool), ref_input=xr[:, 1:], ref_weight=wr),
         ValueError, "ref_input must have shape"),
        (lambda: mk.dpo_loss(t[:3, 0], t[3:, 0]), TypeError, "chosen_logps must be float"),
        (lambda: mk.dpo_loss(x[:3, 0, 0], x[3:, 0, 0], x[:3, 0, 0]), ValueError, "given together"),
        (lambda: mk.dpo_loss(x[:3, 0, 0], x[3:, 0, 0], loss_type="discopop", discopop_tau=-1.0), ValueError,
         "discopop_tau must lie"),
        (lambda: mk.kto_loss(x[:, 0, 0], x[:, 0, 0], torch.ones(6)), ValueError, "desirable must be a bool"),
        (lambda: mk.kto_loss(x[:, 0, 0], x[:, 0, 0], torch.ones(6, dtype=torch.bool), kl=torch.ones(2)), ValueError,
         "kl must be a number"),
        (lambda: mk.LinearKTOLoss()(x, w, t, torch.ones(6, dtype=torch.bool)), ValueError, "ref_logps"),
        (lambda: mk.LinearKTOLoss(undesirable_weight=-1.0), ValueError, "undesirable_weight must lie"),
        (lambda: mk.sequence_log_probs(x, w, t, average=1), TypeError, "average must be a bool"),
        (lambda: mk.sequence_log_probs(x, w[:, 1:], t), ValueError, "weight must have shape"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_bf16_head_under_autocast_and_compile():
    """An fp32 head behind a bf16 autocast backbone is cast to the hidden states' dtype (as the other heads);
    torch.compile(fullgraph=True) traces the whole DPO head."""
    x, w, t, xr, wr = pair_case(dtype=torch.float32)
    head = mk.LinearDPOLoss(rpo_alpha=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x.bfloat16(), w, t, ref_input=xr.bfloat16(), ref_weight=wr)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    eager = head(x, w, t, ref_input=xr, ref_weight=wr)
    compiled = torch.compile(head, fullgraph=True)(x, w, t, ref_input=xr, ref_weight=wr)
    assert torch.allclose(compiled.loss, eager.loss, rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: mk.LinearDPOLoss(reference_free=True), lambda: mk.LinearORPOLoss(),
                                  lambda: mk.LinearSimPOLoss()], ids=["dpo", "orpo", "simpo"])
def test_one_dynamic_graph_over_batch_and_sequence_lengths(make):
    """The logit-mean metric's row blocks are one block under torch.compile: a Python loop over B·T fixed it in the
    graph (a recompile for every batch and sequence length: dynamic padding recompiled each step, fullgraph=True
    failed at the recompile limit)."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    head = make()
    compiled = torch.compile(lambda x, w, t: head(x, w, t).loss, fullgraph=True, dynamic=True, backend=counter)
    w = torch.randn(50, 16)
    for B, T in ((4, 5), (6, 5), (10, 5), (4, 3), (4, 9)):
        x, t = torch.randn(B, T, 16), torch.randint(0, 50, (B, T))
        torch.testing.assert_close(compiled(x, w, t), head(x, w, t).loss)
    assert counter.frame_count == 1


def test_compiled_dpo_head_skips_the_prompt_in_the_reference_forward_and_the_policy_backward(monkeypatch):
    """Inside torch.compile the reference model's log-probs (no_grad) skip the prompt and padding positions in their
    forward op, the policy's in its backward op; the step equals the eager one."""
    from tests.helpers import record_selected_rows
    seen = record_selected_rows(monkeypatch)
    x, w, t, xr, wr = pair_case(dtype=torch.float32)
    head = mk.LinearDPOLoss()

    def step(fn):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xg, wg, t, ref_input=xr, ref_weight=wr).loss
        return (loss, *torch.autograd.grad(loss, (xg, wg)))

    want = step(head)
    assert seen == []  # eager calls select their rows in the functions, not in the ops
    got = step(torch.compile(head, fullgraph=True, backend="aot_eager"))
    labelled = int((t != -100).sum())
    assert seen == [labelled, labelled]  # the reference's forward op, then the policy's backward op
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
