"""marginkern.huggingface.patch_causal_lm against the models' own loss (transformers, tiny random models, fp32)."""
import copy
import inspect
import operator
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import marginkern as mk  # noqa: E402
from marginkern.huggingface import (ROUTER_AUX_LOSS_COEF, SUPPORTED_MODEL_TYPES, patch_causal_lm,  # noqa: E402
                                    unpatch_causal_lm)

V = 300
TINY = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, head_dim=8, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)
# the logit transforms set away from their identity values, so that a patch that dropped one would be far off
SOFTCAP = dict(final_logit_softcapping=4.0)
TRANSFORMS = {**dict.fromkeys(("gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "nanochat", "paligemma",
                               "vaultgemma"), SOFTCAP),
              **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), dict(logit_scale=0.3)),
              **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared"),
                              dict(logits_scaling=8.0)),
              "minicpm3": dict(dim_model_base=4),  # its logits_scaling is hidden_size / dim_model_base
              "hyperclovax": dict(logits_scaling=0.3), "falcon_h1": dict(lm_head_multiplier=0.3)}
# mixtures of experts: a few small experts, the routers' load-balancing loss on and weighted (≈ 1 of the loss)
EXPERTS = dict(num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
               shared_expert_intermediate_size=32, output_router_logits=True, router_aux_loss_coef=0.5,
               aux_loss_coef=0.5)
MIXTURES = set(ROUTER_AUX_LOSS_COEF) | {t for t in SUPPORTED_MODEL_TYPES if "moe" in t} | {
    "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "glm_moe_dsa", "hy_v3", "llama4_text", "longcat_flash",
    "mimo_v2_flash", "solar_open"}
# what a model type needs beyond TINY to be small: multi-head latent attention (DeepSeek), a full-attention layer
# beside the linear one (Qwen3-Next, Qwen3.5), DBRX's own config layout, Gemma 3n's per-layer inputs; no
# randomness in training mode (Seed-OSS's dropout, PhiMoE's router jitter)
LATENT = dict(num_key_value_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, kv_lora_rank=16,
              q_lora_rank=16, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)
HYBRID = dict(layer_types=["linear_attention", "full_attention"])
MROPE = dict(rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=10000.0))  # head_dim 8
SHAPES = {"gemma4_text": dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                             num_kv_shared_layers=2),  # KV-shared layers (its decoder slices an int logits_to_keep)
          "qwen2_vl": MROPE, "qwen2_5_vl": MROPE, "glm4v": MROPE, "qwen3_5": HYBRID, "qwen3_5_moe": HYBRID,
          "phimoe": dict(router_jitter_noise=0.0), "seed_oss": dict(attention_dropout=0.0, residual_dropout=0.0),
          **dict.fromkeys(("deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "glm4_moe_lite", "glm_moe_dsa",
                           "longcat_flash", "minicpm3"), LATENT), "qwen3_next": HYBRID, "qwen3_5_text": HYBRID,
          "qwen3_5_moe_text": HYBRID,
          "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                       attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                       ffn_config=dict(moe_num_experts=4, moe_top_k=2, ffn_hidden_size=64, moe_loss_weight=0.5)),
          "gemma3n_text": dict(num_hidden_layers=4, num_kv_shared_layers=0, laurel_rank=4,
                               layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=8,
                               vocab_size_per_layer_input=V, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4,
                               intermediate_size=[64] * 4)}


# the vision-language models: their image-text-to-text class, a tiny vision tower (28 × 28 images of 14 × 14
# patches), the language model configured as the others; the image (and video) tokens above the ids batch() draws
VISION_LANGUAGE = {t for t, c in ((t, transformers.AutoConfig.for_model(t)) for t in SUPPORTED_MODEL_TYPES)
                   if c.get_text_config() is not c}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, depth=1, embed_dim=32,
              num_heads=4, out_hidden_size=32, image_size=28, patch_size=14, hidden_act="gelu")
IMAGE_TOKEN = V - 1
MEDIA_TOKENS = dict(image_token_id=IMAGE_TOKEN, image_token_index=IMAGE_TOKEN, video_token_id=V - 2,
                    vision_start_token_id=V - 3)


def tiny_model(model_type, **config):
    torch.manual_seed(0)
    experts = EXPERTS if model_type in MIXTURES else {}
    options = {**TINY, **experts, **SHAPES.get(model_type, {}), **TRANSFORMS.get(model_type, {}), **config}
    if model_type in VISION_LANGUAGE:
        cfg = transformers.AutoConfig.for_model(model_type, text_config=options, vision_config=VISION,
                                                tie_word_embeddings=options["tie_word_embeddings"], **MEDIA_TOKENS)
        model = transformers.AutoModelForImageTextToText.from_config(cfg).float().train()
    else:
        cfg = transformers.AutoConfig.for_model(model_type, **options)
        model = transformers.AutoModelForCausalLM.from_config(cfg).float().train()
    with torch.no_grad():  # logits of a few units, as in a trained model: softcap and scale then matter
        model.get_output_embeddings().weight.normal_(0, 1.0)
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V - 3, (3, 11), generator=g)  # (no image or video token)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    return ids, labels


def loss_and_grads(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    loss = out["loss"] if not isinstance(out, tuple) else out[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(got, want):
    # fp32: the patched loss takes the logits as exact dot products where HF rounds each to fp32 after the GEMM
    # and then subtracts the max: a few ulp of the loss; each gradient to 1e-5 of its largest element, plus 1e-7 of
    # the whole gradient's: a scalar parameter that sums over every token and channel (xIELU's α, a linear
    # attention's decay) can cancel fp32 noise of the backbone's backward up to ~3e-5 of its own scale, where that
    # is ~1e-8 of the model's gradient; against float64, HF's fp32 gradient is off as much (Qwen3.5's dt_bias 2e-5,
    # the patched 2e-6; Apertus's α_p 2.5e-6, the patched 3e-5)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert set(got[1]) == set(want[1])
    scale = max(g.abs().max().item() for g in want[1].values()) if want[1] else 0.0
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=0, atol=1e-5 * g.abs().max().item() + 1e-7 * scale,
                                   msg=name)


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_loss_and_grads_equal_the_models_own(model_type):
    model = tiny_model(model_type)
    ids, labels = batch()
    want = loss_and_grads(model, ids, labels=labels)
    patched = patch_causal_lm(copy.deepcopy(model))
    projected = []  # the positions the head projects: none
    patched.get_output_embeddings().register_forward_hook(lambda m, args, out: projected.append(out.shape))
    out = patched(ids, labels=labels)
    assert out.logits is None and out["loss"].shape == () and projected == [(3, 0, V)]
    assert_same_loss_and_grads(loss_and_grads(patched, ids, labels=labels), want)
    if model_type in TRANSFORMS:  # the transform matters at these logits: the plain CE of the head is far off
        hidden = patched.get_decoder()(ids).last_hidden_state
        plain = mk.linear_cross_entropy(hidden, patched.get_output_embeddings().weight, labels, shift=1)
        assert abs(plain.item() - want[0].item()) > 1e-2


def test_trainer_arguments_and_tied_embeddings():
    # what HF's Trainer and context parallelism pass: num_items_in_batch (a tensor) makes the loss a sum over that
    # count; shift_labels replaces the shift; ignore_index; labels positionally; the tuple output
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    patched = patch_causal_lm(copy.deepcopy(model))
    assert patched.get_output_embeddings().weight is patched.get_input_embeddings().weight
    ids, labels = batch()
    count = torch.tensor(41)
    for kwargs in (dict(num_items_in_batch=count), dict(num_items_in_batch=41),
                   dict(shift_labels=torch.roll(labels, -1, 1)),
                   dict(ignore_index=7, labels=ids.masked_fill(ids < 40, 7))):
        kwargs = {"labels": labels, **kwargs}
        assert_same_loss_and_grads(loss_and_grads(patched, ids, **kwargs), loss_and_grads(model, ids, **kwargs))
    positional = (ids, None, None, None, None, labels)  # input_ids, attention_mask, position_ids, cache, embeds, labels
    assert_same_loss_and_grads(loss_and_grads(patched, *positional), loss_and_grads(model, ids, labels=labels))
    out = patched(ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == () and not any(
        torch.is_tensor(t) and t.shape[-1:] == (V,) for t in out[1:])


def test_attention_mask_gradient_checkpointing_and_loss_options():
    model = tiny_model("qwen3")
    ids, labels = batch()
    mask = (labels != -100).long()
    mask[0] = 1
    want = loss_and_grads(model, ids, attention_mask=mask, labels=labels)
    patched = patch_causal_lm(copy.deepcopy(model))
    assert_same_loss_and_grads(loss_and_grads(patched, ids, attention_mask=mask, labels=labels), want)
    patched.activation_checkpointing_enable()
    patched.train()
    assert_same_loss_and_grads(loss_and_grads(patched, ids, attention_mask=mask, labels=labels), want)
    # options the model's own loss lacks: the patched loss is linear_cross_entropy of the decoder's output
    patched = patch_causal_lm(copy.deepcopy(model), z_loss=1e-2, label_smoothing=0.1)
    got = patched(ids, labels=labels).loss
    hidden = patched.get_decoder()(ids).last_hidden_state
    want = mk.linear_cross_entropy(hidden, patched.lm_head.weight, labels, shift=1, z_loss=1e-2, label_smoothing=0.1)
    torch.testing.assert_close(got, want)
    assert (got - loss_and_grads(model, ids, labels=labels)[0]).abs() > 1e-3
    # patching again replaces the options (one decoder hook, not two)
    again = patch_causal_lm(patched, z_loss=1e-2)
    assert again is patched and len(patched.get_decoder()._forward_hooks) == 1
    want = mk.linear_cross_entropy(hidden, patched.lm_head.weight, labels, shift=1, z_loss=1e-2)
    torch.testing.assert_close(patched(ids, labels=labels).loss, want)


@pytest.mark.parametrize("num_items", [None, 13])
def test_token_scaling_is_trls_dft_loss(num_items):
    """patch_causal_lm(token_scaling=True) against TRL's SFT dft_loss on the model's own (soft-capped) logits:
    −sg(p_t)·log p_t over the shifted labels, divided by num_items_in_batch when the Trainer passes it."""
    from tests.test_token_scaling import trl_dft_loss
    model = tiny_model("gemma2")
    ids, labels = batch()
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    dft = trl_dft_loss(logits.flatten(0, 1), shifted.flatten())
    if num_items is not None:
        dft = dft * (shifted != -100).sum() / num_items
    dft.backward()
    want = dft.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    patched = patch_causal_lm(copy.deepcopy(model), token_scaling=True)
    extra = {} if num_items is None else dict(num_items_in_batch=torch.tensor(num_items))
    assert_same_loss_and_grads(loss_and_grads(patched, ids, labels=labels, **extra), want)
    with pytest.raises(ValueError, match="token_scaling=True needs logits_buffer_mb=None"):
        patch_causal_lm(copy.deepcopy(model), token_scaling=True, logits_buffer_mb=8)


def test_prompt_positions_are_skipped_unless_turned_off(monkeypatch):
    """The batch's 10 ignored of 33 positions (prompt, padding, the last ones) leave the head's op; with
    skip_ignored_rows=False they run; the loss is the same."""
    from tests.helpers import record_op_rows
    seen = record_op_rows(monkeypatch)
    model = tiny_model("llama")
    ids, labels = batch()
    skipped = patch_causal_lm(copy.deepcopy(model))(ids, labels=labels).loss
    every_row = patch_causal_lm(copy.deepcopy(model), skip_ignored_rows=False)(ids, labels=labels).loss
    assert seen == [23, 33]
    torch.testing.assert_close(skipped, every_row)
    with pytest.raises(TypeError, match="skip_ignored_rows must be None or a bool"):
        patch_causal_lm(copy.deepcopy(model), loss="emo", skip_ignored_rows="no")


@pytest.mark.parametrize("model_type", ["mixtral", "jetmoe", "dbrx", "qwen3_vl_moe"])  # the coefficient's spellings
def test_mixture_of_experts_adds_the_routers_load_balancing_loss(model_type):
    """A mixture of experts' forward adds coef · aux_loss (the routers' load-balancing loss) to the loss when
    output_router_logits: the patched loss does too, after the division by num_items_in_batch, as HF's; the output
    keeps aux_loss and router_logits, and its tuple (return_dict=False) is HF's without the logits."""
    model = tiny_model(model_type)
    assert operator.attrgetter(ROUTER_AUX_LOSS_COEF[model_type])(model) == 0.5
    patched = patch_causal_lm(copy.deepcopy(model))
    ids, labels = batch()
    for kwargs in (dict(), dict(num_items_in_batch=torch.tensor(13)), dict(output_router_logits=False)):
        want = loss_and_grads(model, ids, labels=labels, **kwargs)
        assert_same_loss_and_grads(loss_and_grads(patched, ids, labels=labels, **kwargs), want)
        got, own = patched(ids, labels=labels, **kwargs), model(ids, labels=labels, **kwargs)
        if kwargs.get("output_router_logits") is False:
            assert got.aux_loss is None and own.aux_loss is None
            continue
        assert got.aux_loss is not None and got.aux_loss > 1  # (≈ 2 at even routing, weighted 0.5: material)
        torch.testing.assert_close(got.aux_loss, own.aux_loss)
        assert len(got.router_logits) == len(own.router_logits)
    got, own = patched(ids, labels=labels, return_dict=False), model(ids, labels=labels, return_dict=False)
    assert len(got) == len(own) - 1  # (loss, aux_loss, router_logits...): HF's less its logits
    torch.testing.assert_close(got[0], own[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], own[1])
    assert own[2].shape[-1] == V and not any(torch.is_tensor(t) and t.shape[-1:] == (V,) for t in got[1:])


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl"])
def test_a_vision_language_model_with_images(model_type):
    """A vision-language model's step with images (the vision tower's gradients included; the image positions
    labelled -100, as a collator masks them) equals its own; its head sees the language model's last hidden state."""
    model = tiny_model(model_type)
    ids, labels = batch()
    ids[:, 1:5], labels[:, 1:5] = IMAGE_TOKEN, -100  # four 14 × 14 patches of a 28 × 28 image per sequence
    g = torch.Generator().manual_seed(5)
    if model_type == "qwen2_vl":  # its processor's layout: the patches flattened, their (t, h, w) grid, 2 × 2 merged
        ids[:, 1:2], labels[:, 1:2] = IMAGE_TOKEN, -100
        ids[:, 2:5], labels[:, 2:5] = torch.randint(3, V - 3, (3, 3), generator=g), -100
        images = dict(pixel_values=torch.randn(3 * 4, 3 * 2 * 14 * 14, generator=g),
                      image_grid_thw=torch.tensor([[1, 2, 2]] * 3), mm_token_type_ids=(ids == IMAGE_TOKEN).long())
    else:
        images = dict(pixel_values=torch.randn(3, 3, 28, 28, generator=g))
    want = loss_and_grads(model, input_ids=ids, labels=labels, **images)
    assert any(name.startswith(("model.vision", "model.visual")) for name in want[1])
    patched = patch_causal_lm(copy.deepcopy(model))
    assert_same_loss_and_grads(loss_and_grads(patched, input_ids=ids, labels=labels, **images), want)


def forward_source(model_type):
    """The source of the forward of transformers' class for a supported model type (its causal LM class, or its
    image-text-to-text class for a vision-language model), which the patch was read against."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    names = (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if model_type in VISION_LANGUAGE
             else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return inspect.getsource(getattr(transformers, names[model_type]).forward)


def test_the_mixtures_of_experts_are_the_forwards_that_add_an_aux_loss():
    """ROUTER_AUX_LOSS_COEF lists exactly the supported model types whose causal LM forward adds an aux_loss, each
    with the attribute that forward multiplies it by (read from transformers' source, so that a type whose forward
    gains one fails here rather than losing it silently)."""
    for model_type in SUPPORTED_MODEL_TYPES:
        forward = forward_source(model_type)
        if model_type in ROUTER_AUX_LOSS_COEF:
            assert f"loss += self.{ROUTER_AUX_LOSS_COEF[model_type]} * aux_loss" in forward, model_type
        else:  # (HY-V3's output has an aux_loss=None field, "not used in this model")
            assert not re.search(r"loss \+?= .*aux_loss", forward), model_type


# the lines of a supported forward after its decoder call, up to its return, that no transform is in: the slicing, the
# head, HF's loss, a mixture's load-balancing loss (their spellings in transformers 5.25)
STRUCTURAL_LINES = {
    "hidden_states = outputs.last_hidden_state", "hidden_states = outputs[0]",
    "hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)", "logits = self.lm_head(hidden_states)",
    "if hidden_states.shape[1] == (input_ids if input_ids is not None else inputs_embeds).shape[1]:",  # (Gemma 4)
    "loss = None", "if labels is not None:", "loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)",
    "loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)",
    "loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)",
    "loss = self.loss_function(", "logits,", "labels,", "vocab_size=self.config.vocab_size,", "**kwargs,", ")",
    "logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs",
    "aux_loss = None", "if output_router_logits:", "aux_loss = load_balancing_loss_func(", "outputs.router_logits,",
    "self.num_experts,", "self.num_experts_per_tok,", "attention_mask,", "self.config.text_config.num_experts,",
    "self.config.text_config.num_experts_per_tok,", "loss.device", ")  # make sure to reside in the same device",
    "loss += self.config.text_config.router_aux_loss_coef * aux_loss.to(",
    *(f"loss += self.{attr} * aux_loss.to(loss.device)  # make sure to reside in the same device"
      for attr in ("router_aux_loss_coef", "aux_loss_coef")),
}


def test_supported_forwards_read_as_the_patch_assumes():
    """Each supported forward does, after its decoder, only what the patch reproduces: a model type without a listed
    transform has no other line there, one with a transform only lines that touch the logits (or the head's input).
    A transformers version that adds a step to a listed forward fails here, to be read again (the equality tests
    cannot see a transform that is the identity at the tiny configs' values)."""
    for model_type in SUPPORTED_MODEL_TYPES:
        lines = [line.strip() for line in forward_source(model_type).splitlines()]
        start = next(i for i, line in enumerate(lines) if re.search(r"= self\.(model|transformer|gpt_neox)\(", line))
        start = lines.index(")", start) + 1  # the end of the decoder call
        end = next(i for i in range(start, len(lines)) if lines[i].startswith("return "))
        odd = [line for line in lines[start:end] if line and not line.startswith("#") and line not in STRUCTURAL_LINES]
        if model_type in TRANSFORMS:
            odd = [line for line in odd if not re.search(r"logit|tanh|lm_head_multiplier", line)]
        assert not odd, (model_type, odd)


def test_without_labels_the_model_is_unchanged_and_unpatch_restores_it():
    model = tiny_model("gemma2")
    patched = patch_causal_lm(copy.deepcopy(model))
    ids, _ = batch()
    import marginkern.huggingface as hf
    hf._warn_unfused_training_step.cache_clear()
    with pytest.warns(UserWarning, match="label_smoothing_factor") as caught:  # a training step that fuses nothing
        torch.testing.assert_close(patched(ids).logits, model(ids).logits)
    assert caught[0].filename == __file__
    generated = patched.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(generated, model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False))
    again = copy.deepcopy(patched)  # a copy keeps its patch (bound to the copy)
    assert again.forward.model is again and again(ids, labels=ids).logits is None
    evaluated = patched.eval()(ids, labels=ids)  # eval mode: HF's forward, logits for an evaluation's metrics
    torch.testing.assert_close(evaluated.loss, model.eval()(ids, labels=ids).loss)
    assert evaluated.logits.shape == (3, 11, V)
    patched.train()
    assert len(patched.get_decoder()._forward_hooks) == 1
    assert unpatch_causal_lm(patched) is patched and patched(ids, labels=ids).logits is not None
    assert not patched.get_decoder()._forward_hooks  # the patch's hook goes with it
    assert patched.state_dict().keys() == model.state_dict().keys()


def test_bf16_model_matches_within_the_logits_rounding():
    # HF's loss rounds each logit to bf16 before its fp32 cross-entropy; the fused loss does not: the two differ
    # by about that rounding (2⁻⁸ relative per logit), not more
    model = tiny_model("llama").to(torch.bfloat16)
    ids, labels = batch()
    want = model(ids, labels=labels).loss
    got = patch_causal_lm(copy.deepcopy(model))(ids, labels=labels).loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=2e-3, atol=0)  # measured 3e-4 (a reviewer's run)


def test_errors_name_what_is_wrong():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="model_type"):
        patch_causal_lm(transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=1, n_head=2)))
    with pytest.raises(TypeError, match="model_type"):
        patch_causal_lm(torch.nn.Linear(2, 2))

    class HalvedLogits(transformers.LlamaForCausalLM):  # a subclass may transform the logits in its own forward
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits / 2
            return out

    with pytest.raises(TypeError, match="own causal LM .*HalvedLogits"):
        patch_causal_lm(HalvedLogits(model.config))

    class PeftLike(torch.nn.Module):  # what peft.PeftModel looks like to the patch
        peft_config = {}

        def get_base_model(self):
            return model

    with pytest.raises(TypeError, match=r"get_base_model\(\)"):
        patch_causal_lm(PeftLike())
    wrapped_forward = copy.deepcopy(model)
    wrapped_forward.forward = lambda *a, **k: type(model).forward(wrapped_forward, *a, **k)  # accelerate.prepare's
    with pytest.raises(TypeError, match="already wrapped"):
        patch_causal_lm(wrapped_forward)
    late = patch_causal_lm(copy.deepcopy(model))
    late.forward = lambda *a, inner=late.forward, **k: inner(*a, **k)
    with pytest.raises(RuntimeError, match="wrapped after patch_causal_lm"):
        unpatch_causal_lm(late)
    with pytest.raises(TypeError, match="unexpected loss options.*'softcap'"):
        patch_causal_lm(copy.deepcopy(model), softcap=30.0)
    with pytest.raises(ValueError, match="z_loss"):
        patch_causal_lm(copy.deepcopy(model), z_loss=-1.0)

    class LoRALinear(torch.nn.Linear):  # a wrapped head computes more than weight and bias
        pass

    wrapped = copy.deepcopy(model)
    wrapped.lm_head.__class__ = LoRALinear
    with pytest.raises(TypeError, match="nn.Linear.*test_huggingface.*LoRALinear"):
        patch_causal_lm(wrapped)
    patched = patch_causal_lm(copy.deepcopy(model))
    ids, labels = batch()
    with pytest.raises(ValueError, match="logits_to_keep"):
        patched(ids, labels=labels, logits_to_keep=1)
    patched.lm_head.__class__ = LoRALinear  # wrapped after patching: refused at the call
    with pytest.raises(TypeError, match="LoRALinear"):
        patched(ids, labels=labels)

    class FSDPLinear(torch.nn.Linear):  # what fully_shard(lm_head) makes of the head
        pass

    sharded = copy.deepcopy(model)
    sharded.lm_head.__class__ = FSDPLinear
    with pytest.raises(TypeError, match="sharded by FSDP2 in a group of its own"):
        patch_causal_lm(sharded)
    # nn.DataParallel's replicas on other devices would run the patched model they copy: refused by device
    with pytest.raises(RuntimeError, match="DataParallel"):
        patch_causal_lm(copy.deepcopy(model))(ids.to("meta"), labels=labels.to("meta"))
    for model_type, loss in (("cohere", "cross_entropy"), ("llama", "emo")):  # a head with a bias
        biased = tiny_model(model_type)
        biased.lm_head = torch.nn.Linear(TINY["hidden_size"], V, bias=True)
        with pytest.raises(ValueError, match="bias"):
            patch_causal_lm(biased, loss=loss)


def emo_recipe_from_logits(model, ids, labels, cost, mode):
    """EMO's official HF patch (DRSY/EMO emo_patch.py, without its detach trick, as gpt2.py) on the model's own
    materialised logits: shift inside, Ê the row-normalised cost, per token EMO = Σ_j p_j·(1 − ê_j·ê_t), the
    MLE-anchored 0.5·(ce + sg(ce/emo)·emo) or EMO alone, averaged over the non-ignored tokens."""
    logits = model(ids).logits[:, :-1].flatten(0, 1).double()
    target = labels[:, 1:].flatten()
    valid = target != -100
    t = target.clamp_min(0)
    e = torch.nn.functional.normalize(cost.detach().double(), dim=-1)
    p = logits.softmax(-1)
    emo = (p * (1 - e @ e[t].t()).t()).sum(-1)
    ce = torch.nn.functional.cross_entropy(logits, t, reduction="none")
    rows = 0.5 * (ce + (ce / (emo + 1e-10)).detach() * emo) if mode == "emo_cross_entropy" else emo
    return (rows * valid).sum() / valid.sum()


@pytest.mark.parametrize("loss", ["emo_cross_entropy", "emo"])
@pytest.mark.parametrize("fixed_cost", [False, True], ids=["adaptive", "fixed"])
def test_emo_losses_equal_the_official_recipe_on_the_models_logits(loss, fixed_cost):
    model = tiny_model("cohere")  # a logit scale, applied to the hidden state
    ids, labels = batch()
    cost = torch.randn(V, 16, generator=torch.Generator().manual_seed(3)) if fixed_cost else None
    model.zero_grad()
    want = emo_recipe_from_logits(model, ids, labels, cost if fixed_cost else model.lm_head.weight, loss)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    options = {"cost_embedding": cost} if fixed_cost else {}
    patched = patch_causal_lm(copy.deepcopy(model), loss=loss, **options)
    got = loss_and_grads(patched, ids, labels=labels)
    assert_same_loss_and_grads(got, (want.float(), {n: g.float() for n, g in want_grads.items()}))
    assert ("_marginkern_cost_embedding" in dict(patched.named_buffers())) == fixed_cost
    assert patched.state_dict().keys() == model.state_dict().keys()
    unpatch_causal_lm(patched)
    assert "_marginkern_cost_embedding" not in dict(patched.named_buffers())


def test_emo_fixed_cost_of_large_norms_survives_half():
    # the buffer holds normalised rows (EMO uses only their directions): a cost of row norms 1e6 cast by model.half()
    # stays finite, and gives the fp32 model's loss
    model = tiny_model("llama")
    ids, labels = batch()
    cost = torch.randn(V, 16, generator=torch.Generator().manual_seed(3)) * 1e6
    want = patch_causal_lm(copy.deepcopy(model), loss="emo", cost_embedding=cost)(ids, labels=labels).loss
    half = patch_causal_lm(copy.deepcopy(model), loss="emo", cost_embedding=cost).half()
    assert half._marginkern_cost_embedding.dtype == torch.float16 and half._marginkern_cost_embedding.isfinite().all()
    got = half(ids, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)


def test_emo_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="softcap"):
        patch_causal_lm(tiny_model("gemma2"), loss="emo")
    with pytest.raises(ValueError, match=r"cost_embedding must be a \(V, E\) tensor with V = 300"):
        patch_causal_lm(tiny_model("llama"), loss="emo", cost_embedding=torch.randn(299, 8))
    with pytest.raises(TypeError, match="unexpected loss options.*'z_loss'"):
        patch_causal_lm(tiny_model("llama"), loss="emo_cross_entropy", z_loss=1e-4)
    with pytest.raises(ValueError, match="loss must be one of"):
        patch_causal_lm(tiny_model("llama"), loss="focal")


def test_signature_generate_and_pickling_see_the_models_forward():
    # the Trainer keeps the dataset columns the forward's signature names, and generate reads it for attention_mask
    # (inferred from pad tokens) and logits_to_keep (the prefill projects the last position only)
    model = tiny_model("llama")
    patched = patch_causal_lm(copy.deepcopy(model))
    assert inspect.signature(patched.forward) == inspect.signature(model.forward)
    ids, _ = batch()
    left_padded = ids[:2, :6].clone()
    left_padded[0, :2] = model.config.pad_token_id
    projected = []
    patched.lm_head.register_forward_hook(lambda m, args, out: projected.append(out.shape[1]))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=model.config.pad_token_id)
    torch.testing.assert_close(patched.generate(left_padded, **kwargs), model.generate(left_padded, **kwargs))
    assert projected == [1, 1, 1]
    # torch.save of the whole model keeps the patch (a bound method would not load)
    import io
    buffer = io.BytesIO()
    torch.save(patch_causal_lm(copy.deepcopy(model)), buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    ids, labels = batch()
    assert_same_loss_and_grads(loss_and_grads(loaded, ids, labels=labels), loss_and_grads(model, ids, labels=labels))
    assert loaded(ids, labels=labels).logits is None


def test_fp32_model_under_autocast_runs_the_head_in_the_autocast_dtype():
    # as the head's F.linear under autocast: bf16 operands (HF's loss then rounds the logits to bf16; this one does not)
    model = tiny_model("llama")
    ids, labels = batch()
    patched = patch_causal_lm(copy.deepcopy(model))
    dtypes = []
    import marginkern.functional as functional
    real = functional.linear_cross_entropy
    try:
        functional_spy = lambda x, w, *a, **k: dtypes.append((x.dtype, w.dtype)) or real(x, w, *a, **k)  # noqa: E731
        import marginkern.huggingface as hf
        hf.LOSSES["cross_entropy"] = (functional_spy, hf.LOSSES["cross_entropy"][1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = loss_and_grads(patched, ids, labels=labels)
            want = loss_and_grads(model, ids, labels=labels)
    finally:
        hf.LOSSES["cross_entropy"] = (real, hf.LOSSES["cross_entropy"][1])
    assert dtypes == [(torch.bfloat16, torch.bfloat16)]
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=0)
    for name, g in want[1].items():  # bf16 operands on both sides, HF's logits rounded to bf16 too: 1.5% measured
        torch.testing.assert_close(got[1][name], g, rtol=0, atol=3e-2 * g.abs().max().item(), msg=name)


def test_trainer_with_gradient_accumulation_takes_the_same_step():
    # HF's Trainer as it comes (its column filter reads the forward's signature; it passes num_items_in_batch, the
    # labelled tokens of all the accumulated micro-batches): one SGD step over 3 uneven micro-batches moves every
    # parameter as the unpatched model's step does
    pytest.importorskip("accelerate")

    def example(i):
        g = torch.Generator().manual_seed(i)
        length = int(torch.randint(3, 14, (1,), generator=g))
        ids = torch.randint(3, V, (length,), generator=g)
        prompt = int(torch.randint(0, length - 1, (1,), generator=g))
        return dict(input_ids=ids, labels=torch.cat([torch.full((prompt,), -100), ids[prompt:]]))

    def collate(items):
        T = max(len(x["input_ids"]) for x in items)
        pad = dict(input_ids=0, labels=-100)
        out = {k: torch.stack([torch.nn.functional.pad(x[k], (0, T - len(x[k])), value=pad[k]) for x in items])
               for k in pad}
        out["attention_mask"] = (torch.arange(T)[None] < torch.tensor([len(x["input_ids"]) for x in items])[:, None])
        return out

    def step(model, folder):
        args = transformers.TrainingArguments(
            output_dir=str(folder), per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=1,
            learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
            use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0, data_seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=[example(i) for i in range(6)],
                                       data_collator=collate)
        trainer.train()
        return dict(model.named_parameters())

    import tempfile
    model = tiny_model("gemma2")  # soft-capped
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as folder:
        want = step(copy.deepcopy(model), folder)
        got = step(patch_causal_lm(copy.deepcopy(model)), folder)
    for name, start in before.items():
        update = (want[name] - start).abs().max().item()
        assert update > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-4 * update, msg=name)


def test_compiled_patched_model_gives_the_same_step():
    # fullgraph: the decoder's hook is registered at patch time (registering one inside the step breaks the graph)
    model = tiny_model("llama")
    ids, labels = batch()
    want = loss_and_grads(model, ids, labels=labels)
    compiled = torch.compile(patch_causal_lm(copy.deepcopy(model)), fullgraph=True)
    try:
        got = loss_and_grads(compiled, ids, labels=labels)
    except torch._dynamo.exc.Unsupported:
        try:  # whether the model itself traces on this torch (transformers 5.25's does not on torch 2.6)
            loss_and_grads(torch.compile(copy.deepcopy(model), fullgraph=True), ids, labels=labels)
        except torch._dynamo.exc.Unsupported as e:
            pytest.skip("the unpatched model does not compile with fullgraph=True on this torch either: "
                        + str(e).splitlines()[0])
        raise
    prefix = "_orig_mod."  # the compiled wrapper's parameter names
    assert_same_loss_and_grads((got[0], {n.removeprefix(prefix): g for n, g in got[1].items()}), want)


def test_compiled_patched_model_runs_the_labelled_tokens_in_its_backward(monkeypatch):
    """Under torch.compile the prompt and padding positions cost no GEMM work in the backward pass
    (skip_ignored_rows inside a compiled graph: the forward runs every position)."""
    from tests.helpers import record_selected_rows
    seen = record_selected_rows(monkeypatch)
    model = tiny_model("llama")
    ids, labels = batch()
    want = loss_and_grads(model, ids, labels=labels)
    compiled = torch.compile(patch_causal_lm(copy.deepcopy(model)), fullgraph=True, backend="aot_eager")
    got = loss_and_grads(compiled, ids, labels=labels)
    assert seen == [int((labels[:, 1:] != -100).sum())]  # the shifted labels: 23 of 33 positions
    prefix = "_orig_mod."
    assert_same_loss_and_grads((got[0], {n.removeprefix(prefix): g for n, g in got[1].items()}), want)


def test_compiled_patched_model_evaluates_the_labelled_tokens_and_steps_on_a_batch_without_any(monkeypatch):
    """Under torch.compile and no_grad (evaluation) the prompt and padding positions cost no GEMM work in the forward
    pass (there is no backward pass to skip them in); a compiled step on a batch without a labelled token (a response
    truncated away) gives 0 and zero gradients (its backward op once handed back a 0-row input gradient)."""
    from tests.helpers import record_selected_rows
    seen = record_selected_rows(monkeypatch)
    model = tiny_model("llama")
    ids, labels = batch()
    compiled = torch.compile(patch_causal_lm(copy.deepcopy(model)), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, want = compiled(ids, labels=labels)["loss"], model(ids, labels=labels)["loss"]
    assert seen == [int((labels[:, 1:] != -100).sum())]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]  # the first label is no position's target after the shift
    loss, grads = loss_and_grads(compiled, ids, labels=labels)
    assert seen[1:] == [0]
    assert loss.item() == 0.0 and grads and not any(g.any() for g in grads.values())


def test_a_batch_without_labelled_tokens_gives_zero_and_zero_gradients():
    # HF's mean over no token is NaN; marginkern's mean is 0 with zero gradients (README)
    model = patch_causal_lm(tiny_model("llama"))
    ids, _ = batch()
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]  # the first label is no position's target after the shift
    loss, grads = loss_and_grads(model, ids, labels=labels)
    assert loss.item() == 0.0 and not any(g.any() for g in grads.values())


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_causal_lm_topk_equals_the_models_own_logits(model_type):
    """causal_lm_topk: the top-k of the model's own logits (its logit transform included) and their log-sum-exp, on a
    plain model and on a patched one."""
    from marginkern.huggingface import causal_lm_topk
    model = tiny_model(model_type).eval()
    ids, _ = batch()
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # padding: the model's own forward takes the mask as it is
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    want_values, want_ids = logits.topk(7, dim=-1)
    for patched in (False, True):
        if patched:
            patch_causal_lm(model)
        values, token_ids, lse = causal_lm_topk(model, 7, input_ids=ids, attention_mask=mask, return_lse=True)
        assert values.shape == token_ids.shape == (3, 11, 7) and lse.shape == (3, 11)
        torch.testing.assert_close(values.double(), want_values, rtol=1e-5, atol=1e-5)
        assert torch.equal(token_ids, want_ids)
        torch.testing.assert_close(lse.double(), logits.logsumexp(-1), rtol=1e-5, atol=1e-5)
    unpatch_causal_lm(model)


def test_causal_lm_topk_refuses_labels():
    from marginkern.huggingface import causal_lm_topk
    model = tiny_model("llama").eval()
    ids, labels = batch()
    with pytest.raises(TypeError, match="causal_lm_topk takes no labels"):  # labels among the model's inputs
        causal_lm_topk(model, 3, input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match="logits_to_keep must be left at its default"):
        causal_lm_topk(model, 3, input_ids=ids, logits_to_keep=1)


def test_causal_lm_topk_runs_the_models_forward_without_a_cache():
    """Through the model's own (possibly wrapped: accelerate's hooks, autocast) forward, with use_cache=False unless
    asked: a KV cache for every token can outweigh the logits it avoids."""
    from marginkern.huggingface import causal_lm_topk
    model = tiny_model("llama").eval()
    ids, _ = batch()
    seen = []

    def wrapped(*args, **kwargs):
        seen.append(kwargs)
        return type(model).forward(model, *args, **kwargs)
    model.forward = wrapped
    causal_lm_topk(model, 3, input_ids=ids)
    causal_lm_topk(model, 3, input_ids=ids, use_cache=True)
    assert [kw["use_cache"] for kw in seen] == [False, True]


def test_causal_lm_topk_applies_the_logit_scale_in_fp32():
    """Cohere's / Granite's scale on a bf16 model: applied to the fp32 logits, not to the bf16 hidden state (which
    rounding would move by ~1e-2 at logits of a few units)."""
    from marginkern.huggingface import causal_lm_topk
    for model_type, factor in (("cohere", lambda c: c.logit_scale), ("granite", lambda c: 1.0 / c.logits_scaling)):
        model = tiny_model(model_type).to(torch.bfloat16).eval()
        ids, _ = batch()
        values, token_ids = causal_lm_topk(model, 5, input_ids=ids)
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        exact = factor(model.config) * (hidden.double() @ model.get_output_embeddings().weight.double().T)
        torch.testing.assert_close(values.double(), exact.gather(-1, token_ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values.double(), exact.topk(5, dim=-1).values, rtol=1e-5, atol=1e-5)


def test_causal_lm_topk_with_an_offloaded_model():
    """accelerate's offloading keeps the head's weight on the meta device between forwards: the top-k loads it."""
    accelerate = pytest.importorskip("accelerate")
    from marginkern.huggingface import causal_lm_topk
    model = tiny_model("gemma2").eval()
    ids, _ = batch()
    want = causal_lm_topk(model, 4, input_ids=ids, return_lse=True)
    offloaded = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    assert offloaded.get_output_embeddings().weight.device.type == "meta"
    for got, expected in zip(causal_lm_topk(offloaded, 4, input_ids=ids, return_lse=True), want):
        torch.testing.assert_close(got, expected)


def test_linear_topk_logit_scale():
    torch.manual_seed(5)
    x, w, b = torch.randn(6, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64), torch.randn(30)
    values, ids = mk.linear_topk(x, w, 4, b.double(), logit_scale=0.3, softcap=2.0)
    z = 2.0 * torch.tanh(0.3 * (x @ w.T + b.double()) / 2.0)
    torch.testing.assert_close(values, z.topk(4, dim=-1).values)
    assert torch.equal(ids, z.topk(4, dim=-1).indices)
    with pytest.raises(ValueError, match="logit_scale must lie in"):
        mk.linear_topk(x, w, 4, logit_scale=0.0)


def test_causal_lm_topk_of_a_compiled_model_runs_its_module():
    from marginkern.huggingface import causal_lm_topk
    model = tiny_model("qwen3").eval()
    ids, _ = batch()
    want = causal_lm_topk(model, 3, input_ids=ids)
    for got, expected in zip(causal_lm_topk(torch.compile(model, backend="eager"), 3, input_ids=ids), want):
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="logits_to_keep must be left at its default"):
        causal_lm_topk(model, 3, input_ids=ids, logits_to_keep=torch.tensor([1]))


def own_sequence_log_probs(model, ids, labels, mask, average):
    """TRL's concatenated forward on the model's own logits (fp32): labels shifted by one, -100 not counted."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    counted = target != -100
    per_token = logits.log_softmax(-1).gather(-1, torch.where(counted, target, 0)[..., None])[..., 0]
    total = (per_token * counted).sum(-1)
    return total / counted.sum(-1) if average else total


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_causal_lm_sequence_log_probs_equal_the_models_own(model_type):
    """Per-sequence log-probabilities (sums and token means) and their gradients for every parameter against TRL's
    arithmetic on the model's own logits (its logit transform included: Cohere's and Granite's scale as a temperature,
    Gemma's softcap); a patched model gives the same without warning that it computed logits."""
    from marginkern.huggingface import causal_lm_sequence_log_probs
    ids, labels = batch()
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    weights = torch.tensor([0.7, -1.3, 0.4])
    for average in (False, True):
        model = tiny_model(model_type)
        want = loss_and_grads_of(lambda: own_sequence_log_probs(model, ids, labels, mask, average), model, weights)
        for patched in (False, True):
            if patched:
                patch_causal_lm(model)
            import marginkern.huggingface as hf
            hf._warn_unfused_training_step.cache_clear()  # (warns once per process: an earlier test may have)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = loss_and_grads_of(lambda: causal_lm_sequence_log_probs(
                    model, labels, average=average, input_ids=ids, attention_mask=mask), model, weights)
            torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
            assert_same_weighted_loss_and_grads(got, want, weights)


@pytest.mark.parametrize("model_type", ["llama", "granite", "gemma2"])
def test_causal_lm_sequence_log_probs_of_a_head_with_a_bias(model_type):
    """A head with a bias (a plain nn.Linear: its bias is part of the projection), with the model type's logit scale
    (Granite's) on the bias too, or its softcap (Gemma 2's)."""
    from marginkern.huggingface import causal_lm_sequence_log_probs
    model = with_biased_head(tiny_model(model_type))
    ids, labels = batch()
    mask = torch.ones_like(ids)
    weights = torch.tensor([0.7, -1.3, 0.4])
    for average in (False, True):
        want = loss_and_grads_of(lambda: own_sequence_log_probs(model, ids, labels, mask, average), model, weights)
        got = loss_and_grads_of(lambda: causal_lm_sequence_log_probs(model, labels, average=average, input_ids=ids,
                                                                      attention_mask=mask), model, weights)
        assert "lm_head.bias" in got[1]
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
        assert_same_weighted_loss_and_grads(got, want, weights)


def assert_same_weighted_loss_and_grads(got, want, weights):
    """loss_and_grads_of's results alike: Σ weights·values nearly cancels with token means (−0.038 from terms of 3–9,
    each a few ulp of its own size off), so the loss's tolerance is the terms' size, not its own."""
    terms = (want[2] * weights).abs().sum().item()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6 * terms)
    assert_same_loss_and_grads((want[0], got[1]), want[:2])


def loss_and_grads_of(fn, model, weights):
    """(Σ weights·fn(), the parameters' gradients, fn()) for a model."""
    model.zero_grad(set_to_none=True)
    values = fn()
    loss = (values * weights).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, values.detach()


def test_dpo_on_a_causal_lm_with_a_reference_model():
    """The documented recipe: the policy's log-probabilities with gradients, the reference model's under no_grad,
    mk.dpo_loss on them; equal to TRL's DPO on both models' own logits."""
    from marginkern.huggingface import causal_lm_sequence_log_probs
    policy, reference = tiny_model("llama"), tiny_model("llama").eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids, labels = batch()
    ids, labels = torch.cat([ids, ids.flip(0)]), torch.cat([labels, labels.flip(0)])  # 3 chosen, then 3 rejected
    mask = torch.ones_like(ids)

    def dpo(logps, ref):
        return mk.dpo_loss(logps[:3], logps[3:], ref[:3], ref[3:], beta=0.1)[0].mean()

    with torch.no_grad():
        ref = causal_lm_sequence_log_probs(reference, labels, input_ids=ids, attention_mask=mask)
        want_ref = own_sequence_log_probs(reference, ids, labels, mask, False)
    torch.testing.assert_close(ref, want_ref, rtol=1e-5, atol=1e-5)
    got = loss_and_grads_of(lambda: dpo(causal_lm_sequence_log_probs(policy, labels, input_ids=ids,
                                                                       attention_mask=mask), ref)[None],
                            policy, torch.ones(1))
    want = loss_and_grads_of(lambda: dpo(own_sequence_log_probs(policy, ids, labels, mask, False), want_ref)[None],
                             policy, torch.ones(1))
    assert_same_loss_and_grads(got[:2], want[:2])


def test_causal_lm_sequence_log_probs_under_autocast_and_offloaded():
    """An fp32 model under a bf16 autocast: the head's operands in bf16 as its F.linear's (within the logits' bf16
    rounding of the model's own); an accelerate-offloaded reference model (its head on the meta device between
    forwards) under no_grad: the same values as before offloading."""
    from marginkern.huggingface import causal_lm_sequence_log_probs
    import marginkern.huggingface as hf
    model = tiny_model("llama")
    ids, labels = batch()
    mask = torch.ones_like(ids)
    seen = []
    real = hf.log_probs_and_entropy
    try:
        hf.log_probs_and_entropy = lambda x, w, *a, **k: seen.append((x.dtype, w.dtype)) or real(x, w, *a, **k)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = causal_lm_sequence_log_probs(model, labels, input_ids=ids, attention_mask=mask)
            want = own_sequence_log_probs(model, ids, labels, mask, False)
    finally:
        hf.log_probs_and_entropy = real
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)
    accelerate = pytest.importorskip("accelerate")
    reference = tiny_model("cohere").eval()
    with torch.no_grad():
        want = causal_lm_sequence_log_probs(reference, labels, input_ids=ids, attention_mask=mask)
        offloaded = accelerate.cpu_offload(copy.deepcopy(reference), execution_device="cpu")
        assert offloaded.get_output_embeddings().weight.device.type == "meta"
        torch.testing.assert_close(causal_lm_sequence_log_probs(offloaded, labels, input_ids=ids, attention_mask=mask),
                                   want)


def test_causal_lm_sequence_log_probs_refuses_labels_among_the_inputs():
    from marginkern.huggingface import causal_lm_sequence_log_probs
    model = tiny_model("llama")
    ids, labels = batch()
    with pytest.raises(ValueError, match=r"labels must have input_ids's shape \(3, 11\)"):
        causal_lm_sequence_log_probs(model, labels[:, 1:], input_ids=ids)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        causal_lm_sequence_log_probs(model, labels.tolist(), input_ids=ids)
    with pytest.raises(TypeError, match="labels must hold integer class indices"):
        causal_lm_sequence_log_probs(model, labels.float(), input_ids=ids)
    with pytest.raises(TypeError, match="average must be a bool"):
        causal_lm_sequence_log_probs(model, labels, average="yes", input_ids=ids)
    with pytest.raises(TypeError, match="not shift_labels"):
        causal_lm_sequence_log_probs(model, labels, input_ids=ids, shift_labels=labels)
    with pytest.raises(ValueError, match="logits_to_keep must be left at its default"):
        causal_lm_sequence_log_probs(model, labels, input_ids=ids, logits_to_keep=1)


def with_biased_head(model):
    """model with its head replaced by an nn.Linear with the same weight and a bias of a few units."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.normal_(0, 2.0)
    model.set_output_embeddings(biased)
    return model


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES) + ["llama+bias", "granite+bias", "gemma2+bias"])
def test_causal_lm_log_probs_and_entropy_equal_the_models_own(model_type):
    """Per-token log-probabilities and entropies at a sampling temperature (TRL's GRPO) against the model's own
    logits / temperature (its logit scale, softcap and head bias included): values, and every parameter's gradient
    of a weighted sum of both; positions after a -100 label and the last position are 0."""
    from marginkern.huggingface import causal_lm_log_probs_and_entropy
    model_type, _, bias = model_type.partition("+")
    model = tiny_model(model_type)
    if bias:
        model = with_biased_head(model)
    ids, labels = batch()
    mask = torch.ones_like(ids)
    g = torch.Generator().manual_seed(3)
    w_lp, w_h = torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g)

    def own():
        logits = model(input_ids=ids, attention_mask=mask).logits.float() / 0.8
        log_p = logits.log_softmax(-1)
        target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
        counted = target != -100
        lp = log_p.gather(-1, torch.where(counted, target, 0)[..., None])[..., 0] * counted
        entropy = -(log_p.exp() * log_p).sum(-1) * counted
        return lp, entropy

    def fused():
        return causal_lm_log_probs_and_entropy(model, labels, temperature=0.8, input_ids=ids, attention_mask=mask)

    results = []
    for fn in (own, fused):
        model.zero_grad(set_to_none=True)
        lp, entropy = fn()
        ((lp * w_lp).sum() + (entropy * w_h).sum()).backward()
        results.append((lp.detach(), entropy.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want_lp, want_h, want_g), (got_lp, got_h, got_g) = results
    torch.testing.assert_close(got_lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5)
    assert (got_lp[:, -1] == 0).all() and (got_lp[0, :3] == 0).all()
    assert_same_loss_and_grads((torch.zeros(()), got_g), (torch.zeros(()), want_g))


def test_causal_lm_log_probs_and_entropy_refuses_a_bad_temperature():
    from marginkern.huggingface import causal_lm_log_probs_and_entropy
    ids, labels = batch()
    with pytest.raises(ValueError, match="temperature must lie"):
        causal_lm_log_probs_and_entropy(tiny_model("llama"), labels, temperature=0.0, input_ids=ids)
