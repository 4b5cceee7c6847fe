"""Supervised fine-tuning cases: the LM-head cross-entropy of lce_cases with half of the tokens ignored (a prompt's
or padding's labels at -100, as SFT trainers mask them). What `skip_ignored_rows` buys: the exact loss runs its
GEMMs on the labelled rows alone.

Providers, measured in one run on the same inputs:
  marginkern            linear_cross_entropy as it comes (skip_ignored_rows=None: the labelled rows only)
  marginkern every row  skip_ignored_rows=False (the ignored rows' logits computed and dropped)
  marginkern compiled   torch.compile of `marginkern` (the forward runs every row, the backward the labelled ones)
  naive, torch.compile  F.cross_entropy(ignore_index=-100) of the full logits, eager and compiled
  liger-kernel, cut-cross-entropy (CUDA, when installed): CCE leaves ignored rows out itself
  3-GEMM floor          the three GEMMs of the labelled rows (the work an exact loss cannot avoid)
"""

import marginkern
from common_providers import compiled, gemm_floor, make_inputs, peer_attribute
from harness import Case, Step
from lce_cases import naive_lce

FLOOR = "3-GEMM floor"
IGNORED_SHARE = 0.5


def cases(device_type, quick):
    if device_type == "cuda":
        all_cases = [Case("sft-llama3-8b", 8192, 4096, 128_256, "bfloat16")]
    else:
        all_cases = [Case("cpu-sft-16k", 1024, 256, 16_384, "float32"),
                     Case("cpu-sft-200k", 512, 128, 200_000, "float32")]
    return all_cases[:1] if quick else all_cases


def sft_step(loss_fn, case, device):
    """lce_cases' inputs with the first IGNORED_SHARE of the rows' targets ignored; forward and backward into x.grad
    and w.grad."""
    x, w, target = make_inputs(case, device)
    target[: int(IGNORED_SHARE * case.N)] = -100

    def fn():
        loss = loss_fn(x, w, target)
        loss.backward()
        return loss.detach()

    return Step(fn, [x, w])


def _marginkern(wrap=lambda loss, device: loss, **options):
    return lambda case, device: sft_step(
        wrap(lambda x, w, target: marginkern.linear_cross_entropy(x, w, target, **options), device), case, device)


def _peer(peer, module, name, wrap):
    def build(case, device):
        loss = wrap(peer_attribute(peer, module, name, device))
        return sft_step(loss, case, device)
    return build


def _first(loss_fn):
    """The loss of a peer that may return (loss, extras)."""
    def loss(*args):
        out = loss_fn(*args)
        return out[0] if isinstance(out, tuple) else out
    return loss


def _labelled_floor(case, device):
    """gemm_floor of the labelled rows: the exact loss's unavoidable work here."""
    labelled = Case(case.name, case.N - int(IGNORED_SHARE * case.N), case.D, case.C, case.dtype)
    return gemm_floor(labelled, device)


PROVIDERS = {
    "marginkern": _marginkern(),
    "marginkern every row": _marginkern(skip_ignored_rows=False),
    "naive": lambda case, device: sft_step(naive_lce, case, device),
    "torch.compile": lambda case, device: sft_step(compiled(naive_lce, device), case, device),
    "liger-kernel": _peer("liger-kernel", "liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss",
                          lambda cls: _first(lambda x, w, t, loss=cls(): loss(w, x, t))),  # weight first
    "cut-cross-entropy": _peer("cut-cross-entropy", "cut_cross_entropy", "linear_cross_entropy",
                               lambda fn: (lambda x, w, t: fn(x, w, t))),
    FLOOR: _labelled_floor,
    "marginkern compiled": _marginkern(compiled),  # last: its compile takes longest (the GPU visit's step is capped)
}
