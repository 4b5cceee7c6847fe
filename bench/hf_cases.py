"""A whole Hugging Face causal LM training step (a small Llama: 2 decoder layers), as transformers computes its loss
and with marginkern.huggingface.patch_causal_lm: what the patch saves end to end, decoder included.

Case shapes (N, D, C) are (tokens = batch × sequence, hidden size, vocabulary). The step is
`model(input_ids, labels=input_ids).loss.backward()` in training mode; the parameters' gradients are the user's
(not extra memory), the decoder's activations are in both providers' extra memory alike, so the difference is the
head and its loss. No GEMM-throughput column (the decoder's GEMMs are not counted); the ratio column is relative to
transformers' own step.

The "sft" cases mask the first half of every sequence's labels (-100: a prompt), as SFT trainers do: the patch then
runs its head on the labelled positions alone (skip_ignored_rows), while transformers' loss still projects all.

Providers:
  transformers       the model's own forward: (B, T, V) logits in the model's dtype, ForCausalLMLoss upcasts them
  marginkern patch   the same model, patched: the head projects no position, linear_cross_entropy of the hidden
                     states (with HF's label shift)
"""
import torch

from harness import Case, Skip, Step

FLOOR = "transformers"
LAYERS = 2
BATCH = {"cuda": 4, "cpu": 2}  # sequences per step; the sequence length is N / BATCH
PROMPT_SHARE = 0.5  # of each sequence, in the "sft" cases


def cases(device_type, quick):
    if device_type == "cuda":  # Llama-3's vocabulary, a 2048-wide model, 8192 tokens, bf16
        all_cases = [Case("hf-llama-128k", 8192, 2048, 128_256, "bfloat16", classifier=False),
                     Case("hf-sft-llama-128k", 8192, 2048, 128_256, "bfloat16", classifier=False)]
    else:
        all_cases = [Case("cpu-hf-llama-32k", 1024, 256, 32_000, "float32", classifier=False),
                     Case("cpu-hf-sft-llama-32k", 1024, 256, 32_000, "float32", classifier=False)]
    return all_cases[:1] if quick else all_cases


def _model_and_batch(case, device):
    try:
        import transformers
    except ImportError as error:
        raise Skip(f"transformers is not installed ({error}); pip install transformers") from None
    heads = max(1, case.D // 64)
    config = transformers.LlamaConfig(vocab_size=case.C, hidden_size=case.D, intermediate_size=4 * case.D,
                                      num_hidden_layers=LAYERS, num_attention_heads=heads,
                                      num_key_value_heads=max(1, heads // 4), max_position_embeddings=8192,
                                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=case.torch_dtype).train()
    batch = BATCH[torch.device(device).type]
    ids = torch.randint(3, case.C, (batch, case.N // batch), device=device)
    labels = ids.clone()
    if "-sft-" in case.name:
        labels[:, : int(PROMPT_SHARE * labels.shape[1])] = -100
    return model, ids, labels


def _step(model, ids, labels):
    def fn():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach()

    return Step(fn, list(model.parameters()))


def transformers_step(case, device):
    return _step(*_model_and_batch(case, device))


def patched_step(case, device):
    import marginkern.huggingface

    model, ids, labels = _model_and_batch(case, device)
    return _step(marginkern.huggingface.patch_causal_lm(model), ids, labels)


PROVIDERS = {"transformers": transformers_step, "marginkern patch": patched_step}
