"""TRL's fused LM head on marginkern's kernels.

TRL's trainers (SFT, GRPO, RLOO, DPO, KTO; TRL 1.15 and 1.16) give the model a fused LM head of their own
(`trl.trainer.utils.add_fused_lm_head`) and call `model(..., fused_lm_head=True)`, which returns per-token
log-probabilities (and, as each trainer asks, the entropy, log Σ_v p_v², the mean logit and whether the label is the
most likely token) without the (B, T, V) logits: a patched causal LM's forward (marginkern.huggingface) never runs
there. TRL's head streams its projection in chunks through `ChunkedLogProbFunction`, whose backward accumulates dW and
dX in fp32 beside them ((V, D)·4 bytes: 2.1 GB at Llama-3-8B shapes). `patch_trl()` makes every such head compute on
`marginkern.log_probs_and_entropy` instead: the same results from one fused pass, its extra memory bounded by
the engine's chunk budget; the model's logit transform as TRL reads it (its logit scale, Gemma's softcap, the head's
bias), then the trainer's sampling temperature.

Per field (TRL's `FusedCausalLMOutput`): log_probs and entropy are differentiable (for every input), the others are
not, as TRL's. `is_top1` counts a label tied with another maximal token (TRL's argmax counts the first of them only);
`log_sum_sq_probs` is log p at half the temperature taken from log p (2·log p_t − log p_t(T/2) = lse(2z) − 2·lse(z)):
one more forward pass, without gradient, as TRL's; `mean_logits` is x·w̄ + b̄ (one matrix-vector product) without a
softcap, and needs one more forward pass with one. Logits are fp32 dot products of the operands in TRL's compute
dtype (the autocast dtype, else the hidden states'), where TRL rounds them to that dtype first. A head in another
dtype than that (an fp32 head under bf16 autocast; GRPO's cast_lm_head_to_fp32 with a bf16 head) is cast whole, where
TRL casts it chunk by chunk: V·D elements of that dtype more while the step runs (its gradient comes back through the
cast in the head's dtype).
"""
import torch

from .functional import log_probs_and_entropy
from .huggingface import _scaled_head
from .preference import mean_logits

# the per-token fields TRL's head can ask for (trl.kernels.chunked_logprob.OPTIONAL_OUTPUTS, and log_probs)
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# TRL's own function, while patch_trl() has replaced it
_replaced = []


class FusedLogProbs:
    """TRL's ChunkedLogProbFunction on marginkern: `apply` takes its arguments and returns its five results
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), None for a field not in `outputs`."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OUTPUTS[1:]):
        del chunk_size  # the engine sizes its own class chunks (a bounded buffer)
        unknown = sorted(set(outputs) - set(OUTPUTS))
        if unknown:
            raise ValueError(f"outputs: unknown fields {unknown}; TRL's fused head has {list(OUTPUTS)}")
        if getattr(weight, "ds_id", None) is not None:  # TRL's backward gathers the head again itself; this one not
            raise NotImplementedError("weight: a DeepSpeed ZeRO-3 partitioned LM head, which marginkern.trl does not "
                                      "gather for the backward pass; run TRL's own head there (unpatch_trl())")
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # TRL's compute dtype: the autocast one (it casts each chunk)
            dtype = torch.get_autocast_dtype(device)
        else:  # e.g. cast_lm_head_to_fp32: fp32 hidden states, the head in the model's dtype
            dtype = hidden.dtype
        hidden, weight, bias = (None if t is None else t.to(dtype) for t in (hidden, weight, bias))
        softcap = final_logit_softcapping
        x, b, t = _scaled_head(hidden, bias, float(logit_scale), softcap, float(temperature))
        # TRL's labels are all valid (its mask compacts or clamps them): no ignored rows to look for
        results = log_probs_and_entropy(x, weight, targets, b, temperature=t, softcap=softcap, skip_ignored_rows=False,
                                        return_top1="is_top1" in outputs)
        log_probs, entropy = results[:2]
        log_sum_sq_probs = mean_logit = None
        with torch.no_grad():  # (TRL's are not differentiable either)
            if "log_sum_sq_probs" in outputs:
                half, _ = log_probs_and_entropy(x, weight, targets, b, temperature=t / 2, softcap=softcap,
                                                skip_ignored_rows=False)
                log_sum_sq_probs = 2.0 * log_probs - half
            if "mean_logits" in outputs:
                mean_logit = mean_logits(x, weight, b, t, softcap)
        return (log_probs, entropy if "entropy" in outputs else None, log_sum_sq_probs, mean_logit,
                results[2] if "is_top1" in outputs else None)


def _trl_utils():
    """trl.trainer.utils, checked to hold the fused head this module replaces (TRL 1.15, 1.16)."""
    try:
        import trl
        import trl.trainer.utils as utils
    except ImportError as error:
        raise ImportError("marginkern.trl.patch_trl needs TRL (pip install trl)") from error
    if not (hasattr(utils, "add_fused_lm_head") and hasattr(utils, "_ChunkedLogProbFunction")):
        raise RuntimeError(f"TRL {trl.__version__} has no fused LM head (trl.trainer.utils.add_fused_lm_head and "
                           f"_ChunkedLogProbFunction, TRL 1.15 and 1.16) for marginkern to replace")
    return utils


def patch_trl():
    """Makes every fused LM head of TRL (trl.trainer.utils.add_fused_lm_head, which TRL's trainers add to their model)
    compute on marginkern, in this process, heads added before the call included. Idempotent; `unpatch_trl()` undoes
    it."""
    utils = _trl_utils()
    if utils._ChunkedLogProbFunction is not FusedLogProbs:
        _replaced.append(utils._ChunkedLogProbFunction)
        utils._ChunkedLogProbFunction = FusedLogProbs


def unpatch_trl():
    """Gives TRL's fused LM heads their own function back (a no-op when patch_trl() did not run)."""
    if _replaced:
        _trl_utils()._ChunkedLogProbFunction = _replaced.pop()
