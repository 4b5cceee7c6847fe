"""A Hugging Face transformers causal LM whose training loss never materialises the (B, T, V) logits.

    model = AutoModelForCausalLM.from_pretrained(...)
    marginkern.huggingface.patch_causal_lm(model)     # this instance only; z_loss=..., label_smoothing=... optional
    loss = model(input_ids, labels=labels).loss         # HF's labels: shifted inside, -100 ignored
    marginkern.huggingface.patch_causal_lm(model, loss="emo_cross_entropy")   # EMO's official recipe, fused
    logits, token_ids = marginkern.huggingface.causal_lm_topk(teacher, 64, input_ids=ids)   # a teacher's top-k cache
    logps = marginkern.huggingface.causal_lm_sequence_log_probs(model, labels, input_ids=ids)   # DPO's log π(y|x)
    log_probs, entropy = marginkern.huggingface.causal_lm_log_probs_and_entropy(model, labels, input_ids=ids)  # GRPO's

With `labels`, in training mode, the patched forward runs the model's own forward with `labels=None` and
`logits_to_keep` set to no position (the decoder runs as HF wrote it; the LM head projects nothing), takes the
decoder's last hidden state from a forward hook, and returns `marginkern.linear_cross_entropy` of it against the
head's weight (and bias), or one of the EMO losses (LOSSES), with HF's loss semantics: labels shifted by one (or
`shift_labels` as given, for context parallelism), mean over the non-ignored tokens, or their sum divided by
`num_items_in_batch` when the Trainer passes it (gradient accumulation); the ignored (prompt, padding) positions
cost no GEMM work in eager mode (under torch.compile, none in the backward pass) when they are at least 1/8 of them
(skip_ignored_rows). The output's `loss` is that value and its `logits` is None. Without `labels` (inference,
`generate`), or in eval mode (an evaluation loop's metrics want the logits; as Liger-Kernel's patches), the model's
own forward runs unchanged.

Logits are exact fp32 dot products here; HF's loss rounds them to the head's dtype first (bf16 models differ in
the loss by about that rounding). Which models: transformers' own causal LM class (or image-text-to-text class, for
a vision-language model) of each of SUPPORTED_MODEL_TYPES, whose forward turns the head's output into logits as
listed there (each one tested against the model's own loss); another model type, a subclass or remote code raises,
since its forward may transform the logits in a way this patch would silently drop. A mixture of experts'
load-balancing loss (ROUTER_AUX_LOSS_COEF) is added as its forward adds it. Tested with transformers 5.25.0 (the test
extra's pin).
"""
import contextlib
import functools
import inspect
import operator
import warnings

import torch

from .checks import (check_bool, check_ignore_index, check_integer_dtype, check_linear_ce_options, check_temperature,
                     check_skip_ignored_rows, check_tensor, check_token_scaling)
from .emo import cost_in_dtype
from .functional import (_shift_targets, emo_cross_entropy, emo_loss, linear_cross_entropy, linear_topk,
                         log_probs_and_entropy)
from .modules import _caller_stacklevel

# model_type → (the factor HF multiplies the head's output by, the Gemma-2 style softcap), from the config. The
# forwards of transformers 5.x: plain `logits = self.lm_head(h)`, a final_logit_softcapping (Gemma 2/3), a factor
# (Cohere's `logits * logit_scale`, Granite's `logits / logits_scaling`, MiniCPM3's on the head's input, Falcon-H1's
# lm_head_multiplier, HyperCLOVA X's logits_scaling); each read in transformers 5.25's source, and each type's
# whole forward (loss and every gradient) tested against the model's own (tests/test_huggingface.py)
_PLAIN = lambda config: (1.0, None)  # noqa: E731
_SOFTCAP = lambda config: (1.0, config.final_logit_softcapping)  # noqa: E731
_LOGIT_SCALE = lambda config: (float(config.logit_scale), None)  # noqa: E731
_LOGITS_SCALING = lambda config: (1.0 / float(config.logits_scaling), None)  # noqa: E731
# the mixtures of experts among them whose forward adds the routers' load-balancing loss (out.aux_loss, computed
# when output_router_logits) to the loss: model_type → the model's attribute it is multiplied by (a dotted path)
ROUTER_AUX_LOSS_COEF = {
    **dict.fromkeys(("dbrx", "ernie4_5_moe", "flex_olmo", "gpt_oss", "granitemoe", "granitemoe_swa",
                     "granitemoeshared", "laguna", "mellum", "minimax", "minimax_m2", "mixtral", "olmoe", "phimoe",
                     "qwen2_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next"),
                    "router_aux_loss_coef"),
    "jetmoe": "aux_loss_coef",
    **dict.fromkeys(("qwen3_5_moe", "qwen3_vl_moe"), "config.text_config.router_aux_loss_coef"),
}
SUPPORTED_MODEL_TYPES = {
    **dict.fromkeys(("afmoe", "apertus", "arcee", "bitnet", "cwm", "dbrx", "deepseek_v2", "deepseek_v3",
                     "deepseek_v32", "dots1", "ernie4_5", "ernie4_5_moe", "exaone4", "exaone_moe", "flex_olmo",
                     "gemma", "glm", "glm4", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_neox", "gpt_oss",
                     "helium", "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3", "jais2", "jetmoe", "laguna", "lfm2",
                     "llama", "llama4_text", "longcat_flash", "mellum", "mimo_v2_flash", "minimax", "minimax_m2",
                     "ministral", "ministral3", "mistral", "mixtral", "nemotron", "olmo", "olmo2", "olmo3",
                     "olmo_hybrid", "olmoe", "phi", "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3",
                     "qwen3_5_moe_text", "qwen3_5_text", "qwen3_moe", "qwen3_next", "seed_oss", "smollm3",
                     "solar_open", "stablelm", "starcoder2"),
                    _PLAIN),
    **dict.fromkeys(("gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "nanochat", "vaultgemma"), _SOFTCAP),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), _LOGIT_SCALE),
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "minicpm3"),
                    _LOGITS_SCALING),
    "falcon_h1": lambda config: (float(config.lm_head_multiplier), None),
    "hyperclovax": lambda config: (float(config.logits_scaling), None),
    # vision-language models (transformers' image-text-to-text class of the type): the language model's head as
    # above; Gemma 3's applies no softcap, PaliGemma's its text config's
    **dict.fromkeys(("gemma3", "glm4v", "idefics3", "internvl", "llava", "llava_onevision", "mistral3", "qwen2_5_vl",
                     "qwen2_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe", "smolvlm"), _PLAIN),
    "paligemma": lambda config: (1.0, getattr(config.get_text_config(), "final_logit_softcapping", None)),
}

# loss → (the function, the options a patched model may be given); the rest follow from the model and HF's semantics
LOSSES = {
    # token_scaling=True: DFT, TRL's SFT loss_type="dft" (TRL's trainers do not run a patched forward: README)
    "cross_entropy": (linear_cross_entropy, ("label_smoothing", "z_loss", "focal_gamma", "gamma_ce", "grad_filter_eps",
                                             "logits_buffer_mb", "token_scaling", "skip_ignored_rows")),
    # EMO's official code patches HF's Llama forward with these: the MLE-anchored recipe, or EMO alone; the cost
    # embedding defaults to the live head, detached ("adaptive"), or a fixed (V, E) one (kept as a buffer)
    "emo_cross_entropy": (emo_cross_entropy, ("cost_embedding", "skip_ignored_rows")),
    "emo": (emo_loss, ("cost_embedding", "skip_ignored_rows")),
}
_COST_BUFFER = "_marginkern_cost_embedding"


def patch_causal_lm(model, *, loss="cross_entropy", **loss_options):
    """Make this model instance compute its training loss with marginkern's fused `loss`, a key of LOSSES
    (module docstring); returns the model. `loss_options`: that loss's options in LOSSES (HF's own loss has none of
    them: cross_entropy's defaults reproduce it). EMO's `cost_embedding` becomes a non-persistent buffer of the model
    (it moves with .to(), it is not saved). Patch before wrapping the model (PEFT, accelerate.prepare, FSDP, DDP):
    a wrapper's own forward then calls this one. Patching a patched model replaces its loss and options;
    `unpatch_causal_lm` undoes it."""
    head = _check_model(model)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    unknown = sorted(set(loss_options) - set(LOSSES[loss][1]))
    if unknown:
        raise TypeError(f"patch_causal_lm(loss={loss!r}) got unexpected loss options {unknown}; expected any of "
                        f"{list(LOSSES[loss][1])}")
    scale, softcap = SUPPORTED_MODEL_TYPES[model.config.model_type](model.config)
    if scale != 1.0 and head.bias is not None:  # the scale is applied to the hidden state, which a bias would escape
        raise ValueError(f"model: a {type(model).__name__} head with a bias is not supported (its logit scale)")
    options = dict(loss_options)
    if loss == "cross_entropy":
        check_linear_ce_options(options.get("label_smoothing", 0.0), options.get("z_loss", 0.0), softcap,
                                options.get("focal_gamma", 0.0), options.get("gamma_ce", 0.0))
        check_token_scaling(options.get("token_scaling", False), options.get("logits_buffer_mb"))
    elif softcap is not None or head.bias is not None:
        raise ValueError(f"loss={loss!r} takes no {'softcap' if softcap is not None else 'bias'}, which this "
                         f"{type(model).__name__}'s head has")
    if "skip_ignored_rows" in options:
        options["skip_ignored_rows"] = check_skip_ignored_rows(options["skip_ignored_rows"])
    cost = options.pop("cost_embedding", None)
    if cost is not None and (not torch.is_tensor(cost) or cost.dim() != 2 or cost.shape[0] != head.weight.shape[0]):
        raise ValueError(f"cost_embedding must be a (V, E) tensor with V = {head.weight.shape[0]} (the head's rows), "
                         f"got {tuple(cost.shape) if torch.is_tensor(cost) else type(cost).__name__}")
    unpatch_causal_lm(model)
    if cost is not None:
        # rows normalised now (EMO uses only their directions): model.half() then cannot overflow them
        model.register_buffer(_COST_BUFFER, cost_in_dtype(cost.to(head.weight.device), cost.dtype, normalise=True),
                              persistent=False)
    model._marginkern_loss = (loss, options)
    model.forward = _FusedLossForward(model)
    return model


def unpatch_causal_lm(model):
    """Undo `patch_causal_lm` (the class's forward serves again); returns the model."""
    if not hasattr(model, "_marginkern_loss"):
        return model
    if not isinstance(vars(model).get("forward"), _FusedLossForward):
        raise RuntimeError("model.forward was wrapped after patch_causal_lm (accelerate.prepare?): unpatch the model "
                           "before wrapping it")
    model.forward.hook.remove()
    del model.forward
    del model._marginkern_loss
    if hasattr(model, _COST_BUFFER):
        delattr(model, _COST_BUFFER)
    return model


class _FusedLossForward:
    """A patched model's forward (`_forward_with_fused_loss` on it). A callable object rather than a bound method so
    that its signature is the class forward's (the Trainer keeps the dataset columns it names; generate reads it for
    attention_mask and logits_to_keep) and the model pickles (torch.save) with its patch. It also holds the decoder's
    forward hook, registered once here: registering one inside a step breaks a compiled step's graph."""

    def __init__(self, model):
        self.model = model
        self.decoded = []  # one slot per fused step in flight, which the hook fills with the decoder's output
        self.hook = _decoder(model).register_forward_hook(self._keep_decoded)

    def _keep_decoded(self, module, inputs, output):
        if self.decoded:  # a fused step is waiting for it (not: eval, generate, the class's own forward)
            self.decoded[-1] = output

    @property
    def __signature__(self):
        return inspect.signature(type(self.model).forward.__get__(self.model))

    def __call__(self, *args, **kwargs):
        return _forward_with_fused_loss(self.model, self, *args, **kwargs)


def _check_model(model, forward_may_be_wrapped=False):
    """model's head if model is an instance of the very class transformers registers as its model type's causal LM
    (or image-text-to-text model; not a subclass, nor remote code reusing a model_type: either may transform the
    logits in its own forward), of a
    listed model type, its forward not wrapped by anyone else yet (unless `forward_may_be_wrapped`: a caller of the
    class's forward). Raises naming the problem otherwise."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        raise TypeError("model is a PEFT wrapper: patch the model before get_peft_model, or "
                        "patch_causal_lm(model.get_base_model())")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    registered = (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type),
                  MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type))  # (a vision-language model's)
    cls = type(model)
    if (model_type not in SUPPORTED_MODEL_TYPES or cls.__name__ not in registered
            or not cls.__module__.startswith("transformers.models.")):
        raise TypeError(f"model must be an instance of transformers' own causal LM (or image-text-to-text) class of a "
                        f"model_type in {sorted(SUPPORTED_MODEL_TYPES)} (a subclass or remote code may transform the "
                        f"logits), got {cls.__module__}.{cls.__qualname__} (model_type {model_type!r})")
    if "logits_to_keep" not in inspect.signature(cls.forward).parameters:
        raise TypeError(f"model: {cls.__name__}.forward takes no logits_to_keep, which the patch needs to skip the LM "
                        f"head's projection (transformers ≥ 4.50 has it)")
    wrapped = vars(model).get("forward")
    if wrapped is not None and not isinstance(wrapped, _FusedLossForward) and not forward_may_be_wrapped:
        raise TypeError("model.forward is already wrapped (accelerate.prepare?): patch the model before wrapping it")
    return _plain_linear_head(model)


def _keyword_arguments(forward, model, args, kwargs):
    """forward's arguments as one keyword dict (labels may come positionally; **kwargs flattened in)."""
    bound = inspect.signature(forward).bind(model, *args, **kwargs)
    arguments = {}
    for name, value in list(bound.arguments.items())[1:]:  # past `self`
        if bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif bound.signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(model).__name__}.forward takes *{name}, which the patch cannot pass on")
        else:
            arguments[name] = value
    return arguments


def _plain_linear_head(model):
    """The model's LM head, which must be a plain nn.Linear: its weight (and bias) are then all of its projection. A
    LoRA-wrapped or quantised head computes something else, which the fused loss would silently replace."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        cls = type(head)
        if cls.__name__.startswith("FSDP") and isinstance(head, torch.nn.Linear):
            raise TypeError("model: its head is sharded by FSDP2 in a group of its own (fully_shard(lm_head)), so its "
                            "weight is resharded before the loss runs; leave the head in the root model's group")
        raise TypeError(f"model.get_output_embeddings() must be a torch.nn.Linear (the fused loss uses its weight and "
                        f"bias as the whole projection), got {cls.__module__}.{cls.__qualname__}; leave the head out "
                        f"of LoRA (target_modules, modules_to_save) and quantisation")
    return head


@functools.lru_cache(maxsize=None)  # once (as dispatch._warn_fallback)
def _warn_unfused_training_step():
    """A training-mode step without labels computes the full logits (HF's Trainer removes labels before the forward
    when label_smoothing_factor or compute_loss_func is set, and computes the loss itself)."""
    warnings.warn("a model patched by marginkern.huggingface ran a training-mode forward without labels: HF's own "
                  "forward computed the full (B, T, V) logits. HF's Trainer removes the labels when "
                  "label_smoothing_factor or compute_loss_func is set: give the patch label_smoothing=... "
                  "instead", stacklevel=_caller_stacklevel())


def _forward_with_fused_loss(self, patch, *args, **kwargs):
    """The patched forward (module docstring); `self` is the model, `patch` its _FusedLossForward."""
    cls_forward = type(self).forward
    arguments = _keyword_arguments(cls_forward, self, args, kwargs)
    if arguments.get("labels") is None or not self.training:  # eval keeps HF's logits for metrics (as Liger)
        keep = arguments.get("logits_to_keep", 0)
        projects_nothing = torch.is_tensor(keep) and keep.numel() == 0  # (causal_lm_sequence_log_probs' forward)
        if self.training and torch.is_grad_enabled() and not projects_nothing:
            _warn_unfused_training_step()
        return cls_forward(self, *args, **kwargs)
    head = _plain_linear_head(self)
    head_device = head.weight.device
    inputs = arguments.get("input_ids") if arguments.get("input_ids") is not None else arguments.get("inputs_embeds")
    if torch.is_tensor(inputs) and inputs.device != head_device:
        raise RuntimeError(f"a patched model on {head_device} got inputs on {inputs.device}: move them to the model's "
                           f"device (nn.DataParallel's replicas share the patched forward of the model they copy, so "
                           f"they are not supported: use DistributedDataParallel, torchrun)")
    labels, shift_labels = arguments.pop("labels"), arguments.pop("shift_labels", None)
    num_items_in_batch, ignore_index = arguments.pop("num_items_in_batch", None), arguments.pop("ignore_index", -100)
    keep = arguments.pop("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):
        raise ValueError("logits_to_keep must be left at its default when labels are given to a patched model "
                         "(the loss covers every position; no logits are computed)")
    return_dict = arguments.pop("return_dict", None)  # as transformers' can_return_tuple: else the config's
    return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
    patch.decoded.append(None)
    try:
        no_position = torch.empty(0, dtype=torch.long, device=head_device)
        out = cls_forward(self, labels=None, logits_to_keep=no_position, return_dict=True, **arguments)
    finally:
        decoded = patch.decoded.pop()
    hidden = _last_hidden_state(decoded)
    scale, softcap = SUPPORTED_MODEL_TYPES[self.config.model_type](self.config)
    if scale != 1.0:
        hidden = hidden * scale
    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled(hidden.device.type):  # the head's operands in the autocast dtype, as its F.linear's
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight, bias = (None if t is None else t.to(dtype) for t in (hidden, weight, bias))
    target, shift = (labels, 1) if shift_labels is None else (shift_labels, 0)
    name, options = self._marginkern_loss
    if name == "cross_entropy":
        options = dict(options, bias=bias, softcap=softcap)
    else:
        options = dict(options, cost_embedding=getattr(self, _COST_BUFFER, None))
    loss = LOSSES[name][0](hidden, weight, target.to(hidden.device), ignore_index=ignore_index, shift=shift,
                           reduction="mean" if num_items_in_batch is None else "sum", **options)
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    aux_loss = out.get("aux_loss")  # a mixture of experts' load-balancing loss, added as the model's forward adds it
    if aux_loss is not None:
        if self.config.model_type not in ROUTER_AUX_LOSS_COEF:  # (a transformers version this patch was not read for)
            raise RuntimeError(f"model: {type(self).__name__}'s forward returned an aux_loss, whose coefficient this "
                               f"patch does not know; unpatch_causal_lm(model) or output_router_logits=False")
        coef = operator.attrgetter(ROUTER_AUX_LOSS_COEF[self.config.model_type])(self)
        loss = loss + coef * aux_loss.to(loss.device)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    out = type(out)(loss=loss, logits=None, **fields)
    return out if return_dict else out.to_tuple()  # HF's tuple leaves out the fields that are None


@torch.no_grad()
def causal_lm_topk(model, k, *, return_lse=False, **model_inputs):
    """The k most probable next tokens of a causal LM at every position, as a distillation pipeline caches its teacher,
    without the (B, T, V) logits: the model's forward runs with the LM head projecting nothing (as a patched model's
    training step) and no KV cache (unless use_cache=True is passed), and `marginkern.linear_topk` streams the head over
    its last hidden state with the model type's logit transform (SUPPORTED_MODEL_TYPES: Gemma 2/3's softcap, Cohere's
    and Granite's scales, applied in fp32). model_inputs: the forward's (input_ids, attention_mask, ...; no labels).

    Returns (logits (B, T, k) fp32 in descending order, token_ids (B, T, k) int64[, lse (B, T) fp32]): the model's
    logits at those tokens as fp32 dot products of its hidden state and head (HF's own are rounded to the head's
    dtype), and with return_lse their log-sum-exp over the vocabulary (logits − lse are the top-k log-probabilities).
    No gradient. Row t is the distribution of the token after position t, as the student's row t: distill with
    `linear_topk_kl_divergence(hidden, head.weight, token_ids, logits, labels, shift=1)`, labels the input ids with
    -100 at padding (the last position and the padding then count nothing). The model runs through its own forward
    (accelerate's hooks, autocast and offloading included) in the mode it is in: a teacher wants model.eval(). A
    torch.compile'd model (OptimizedModule) runs its original module.
    """
    model, head, hidden = _hidden_states_without_logits(model, "causal_lm_topk", model_inputs)
    scale, softcap = SUPPORTED_MODEL_TYPES[model.config.model_type](model.config)
    with _head_on(head, hidden.device):
        weight, bias = head.weight, head.bias
        return linear_topk(hidden.to(weight.device, weight.dtype), weight, k, bias, softcap=softcap,
                           logit_scale=scale, return_lse=return_lse)


def causal_lm_sequence_log_probs(model, labels, *, average=False, ignore_index=-100, **model_inputs):
    """log π(labels | inputs) per sequence of a causal LM, differentiable, without the (B, T, V) logits: TRL's
    concatenated forward for the preference losses (marginkern.dpo_loss, orpo_loss, ...). labels (B, T) as HF's:
    shifted inside (position t scores label t + 1), ignore_index (the prompt, the padding) not counted; average=True
    gives the mean over the counted tokens (IPO, ORPO, SimPO), else their sum. model_inputs: the forward's (input_ids,
    attention_mask, ...). Returns (B,) fp32 (fp64 for an fp64 model).

    The model runs its own forward with the LM head projecting nothing (as a patched model's training step; no KV
    cache unless use_cache=True), then `marginkern.log_probs_and_entropy` streams the head over the last hidden
    state with the model type's logit transform (Cohere's and Granite's scales as a temperature, in fp32; Gemma 2/3's
    softcap; a head's bias). Under no_grad it serves a reference model (accelerate's offloaded heads included). The
    model is called as it is given: under DistributedDataParallel, gradient synchronisation relies on the wrapper's
    own forward, so run this inside it (TRL's _forward_redirection) or use patch_causal_lm's loss instead.
    """
    average = check_bool("average", average)
    with _lm_head_operands(model, labels, ignore_index, model_inputs, "causal_lm_sequence_log_probs") as operands:
        hidden, weight, bias, labels, ignore_index, scale, softcap = operands
        hidden, bias, temperature = _scaled_head(hidden, bias, scale, softcap, 1.0)
        log_probs, _ = log_probs_and_entropy(hidden, weight, labels, bias, temperature=temperature, softcap=softcap,
                                             ignore_index=ignore_index, shift=1)
        counted = _shift_targets(labels, 1, ignore_index) != ignore_index
        total = log_probs.sum(-1)
        return total / counted.sum(-1).clamp_min(1) if average else total


def causal_lm_log_probs_and_entropy(model, labels, *, temperature=1.0, ignore_index=-100, **model_inputs):
    """Per-token log p(label) and the entropy of softmax(logits / temperature) of a causal LM, differentiable, without
    the (B, T, V) logits: TRL's GRPOTrainer._get_per_token_logps_and_entropies (then marginkern.grpo_loss). labels
    (B, T) as HF's, shifted inside (position t scores label t + 1; the last position and ignore_index count nothing:
    0 there). Returns ((B, T), (B, T)) fp32 (fp64 for an fp64 model). The model's logits as its forward makes them
    (Cohere's and Granite's logit scale, Gemma 2/3's final-logit softcap, a head's bias), then divided by the
    temperature, as a sampler does. Running the model: as causal_lm_sequence_log_probs.
    """
    check_temperature(temperature)  # (before the model's forward runs)
    with _lm_head_operands(model, labels, ignore_index, model_inputs, "causal_lm_log_probs_and_entropy") as operands:
        hidden, weight, bias, labels, ignore_index, scale, softcap = operands
        hidden, bias, temperature = _scaled_head(hidden, bias, scale, softcap, temperature)
        return log_probs_and_entropy(hidden, weight, labels, bias, temperature=temperature, softcap=softcap,
                                     ignore_index=ignore_index, shift=1)


def _scaled_head(hidden, bias, scale, softcap, temperature):
    """(hidden, bias, temperature) for log_probs_and_entropy of a model whose logits are softcap(s·(h·wᵀ + b)): a scale
    s > 0 joins the temperature where nothing caps the logits, else the head's operands ((h·wᵀ + b)·s =
    (s·h)·wᵀ + s·b: one scaled copy of the hidden states)."""
    if scale == 1.0:
        return hidden, bias, temperature
    if softcap is None and scale > 0:
        return hidden, bias, temperature / scale
    return hidden * scale, None if bias is None else bias * scale, temperature


@contextlib.contextmanager
def _lm_head_operands(model, labels, ignore_index, model_inputs, caller):
    """The checked labels, the model's last hidden state and its head's operands, in a context in which an offloaded
    head is materialised: (hidden, weight, bias, labels, ignore_index, logit scale, softcap)."""
    if "shift_labels" in model_inputs:
        raise TypeError(f"{caller} takes labels as HF's (shifted inside), not shift_labels")
    check_tensor("labels", labels)
    ids = model_inputs.get("input_ids")
    if labels.dim() != 2 or (torch.is_tensor(ids) and labels.shape != ids.shape):
        want = f"input_ids's shape {tuple(ids.shape)}" if torch.is_tensor(ids) else "shape (B, T)"
        raise ValueError(f"labels must have {want}, got shape {tuple(labels.shape)}")
    check_integer_dtype(labels, "labels")
    ignore_index = check_ignore_index(ignore_index)
    model, head, hidden = _hidden_states_without_logits(model, caller, model_inputs)
    scale, softcap = SUPPORTED_MODEL_TYPES[model.config.model_type](model.config)
    with _head_on(head, hidden.device):
        weight, bias = head.weight, head.bias
        hidden = hidden.to(weight.device)
        if torch.is_autocast_enabled(hidden.device.type):  # the head's operands in the autocast dtype, as F.linear's
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight, bias = (None if t is None else t.to(dtype) for t in (hidden, weight, bias))
        yield hidden, weight, bias, labels.to(hidden.device), ignore_index, scale, softcap


def _hidden_states_without_logits(model, caller, model_inputs):
    """(the model as checked, its head, the decoder's last hidden state) of a forward with the LM head projecting
    nothing: model_inputs as the model's forward takes them, without labels."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: checked and run as the module it wraps
    head = _check_model(model, forward_may_be_wrapped=True)
    if "labels" in model_inputs or "shift_labels" in model_inputs:
        raise TypeError(f"{caller} takes no labels among the model's inputs")
    keep = model_inputs.pop("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):
        raise ValueError("logits_to_keep must be left at its default: the result covers every position")
    model_inputs.setdefault("use_cache", False)  # a KV cache for every token can outweigh the logits avoided
    decoded = []
    hook = _decoder(model).register_forward_hook(lambda module, inputs, output: decoded.append(output))
    try:
        # an index on the CPU: the decoder's output may sit on another device than the head (device_map="auto")
        model(logits_to_keep=torch.empty(0, dtype=torch.long), **model_inputs)
    finally:
        hook.remove()
    hidden = _last_hidden_state(decoded[-1])
    decoded.clear()  # (and with it the decoder's other outputs, before the head streams)
    return model, head, hidden


def _decoder(model):
    """The module whose output is the hidden state the head takes: get_decoder(), or the model's `model` where that
    returns the model itself (Llama 4's text model)."""
    decoder = model.get_decoder()
    return model.model if decoder is model else decoder


def _last_hidden_state(decoded):
    """The decoder's last hidden state from its output (a model output, or its tuple with return_dict=False)."""
    return decoded.last_hidden_state if hasattr(decoded, "last_hidden_state") else decoded[0]


def _head_on(head, device):
    """A context in which head's weight is materialised: accelerate's offloading leaves it on the meta device between
    its forwards (align_module_device loads it onto `device`); a plain head as it is."""
    if getattr(head, "_hf_hook", None) is None:
        return contextlib.nullcontext()
    from accelerate.utils import align_module_device
    return align_module_device(head, device)
