"""Adapter methods, registered by name: how each wraps a loaded model and what it checks in a recipe.

Every method gets the task head's module names (`heads`, read from the loading report by
`peft_ft.models.loading.load_model`) and puts them in peft's `modules_to_save`, so the head trains and is
saved inside the adapter file whatever the method.

Light at import (no torch); peft is imported when a method actually wraps a model.
"""

from __future__ import annotations

import inspect
import logging
import os
import types
from dataclasses import dataclass
from typing import Callable

from peft_ft.data.batching import pad_batch
from peft_ft.errors import PeftFtError
from peft_ft.models.integrity import hidden_width
from peft_ft.models.loading import load_config, position_limit, quiet_transformers
from peft_ft.recipe.schema import Recipe

log = logging.getLogger("peft_ft")

# Which linear layers LoRA adapts, by `config.model_type`. Every linear layer of the encoder by
# default (attention and feed-forward): on small models this keeps quality close to full
# fine-tuning at ~1.5 % trainable parameters. T5 follows the LoRA paper (attention q and v).
# A name also matching a head layer (RoBERTa's `classifier.dense`) is harmless: peft leaves
# modules in `modules_to_save` alone.
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "camembert": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}

# IA3 (Liu et al. 2022) scales keys, values and the input of each feed-forward block's second
# linear layer: (target_modules, feedforward_modules) by `config.model_type`. In BERT-style layers
# that layer is `layer.N.output.dense`; a plain `output.dense` (peft's own default) would also
# catch `attention.output.dense` and scale it as feed-forward, hence the regular expressions
# (peft matches a string with re.fullmatch against the full module name).
_BERT_FF = r".*\.layer\.\d+\.output\.dense"
IA3_TARGETS: dict[str, tuple[str | list[str], str | list[str]]] = {
    **{t: (rf"(?:.*\.(?:key|value)|{_BERT_FF})", _BERT_FF) for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "deberta-v2": (rf"(?:.*\.(?:key_proj|value_proj)|{_BERT_FF})", _BERT_FF),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wo"], ["wo"]),
}

# peft's generic PeftModel (task_type None, used for extractive QA so that segment ids reach the
# model) never applies prompt-learning adapters: they need the task-specific wrapper, found here
# from the model's class when the task gives no task type.
_PROMPT_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}


@dataclass(frozen=True)
class Method:
    name: str
    is_adapter: bool  # False: every weight trains and the whole model is saved
    default_lr: float
    wrap: Callable  # (model, recipe, heads: list[str], peft_task_type: str | None) -> model
    validate: Callable[[Recipe], list[str]] = lambda recipe: []
    prompt_learning: bool = False  # virtual tokens or prefixes: cannot be merged into the base
    # Checks that need the model's architecture (location, recipe, task), run by `run` and `validate` before a run
    # folder exists: (location, recipe, auto_class, peft_task_type) -> None, raising PeftFtError.
    preflight: Callable | None = None
    # Model types the pre-flight passes on the locked versions (tests/test_methods.py runs it on each): `validate`
    # skips it for them, as it costs the torch, transformers and peft imports (seconds); `run` always runs it.
    preflight_passes: frozenset[str] = frozenset()
    summary: str = ""  # what it wraps and trains (for `peft-ft explain adapter`)
    lr_reason: str = ""  # why default_lr
    # Called once the loop knows its data and step count: (model, recipe, TrainingStart) -> a callback run
    # after every optimizer step with the number of steps done before it, or None.
    on_train_start: Callable | None = None
    # (recipe) -> a learning-rate multiplier per parameter name, or None for one rate (LoRA+).
    lr_scale: Callable | None = None
    # Default target modules by `config.model_type` (None: the method targets no modules by name).
    targets: dict | None = None
    eight_bit: bool = False  # trains on a base loaded in 8 bits (model.load_in_8bit)
    # Prepends virtual tokens to the input embeddings: token-level outputs shift by num_virtual_tokens.
    prepends_tokens: bool = False
    # Checks against the base's config.json (no torch): (config dict, recipe, model type) -> problems.
    config_check: Callable[[dict, Recipe, str], list[str]] | None = None
    # Checks that need the built model's modules, run on a weightless skeleton: (skeleton, recipe) -> None,
    # raising PeftFtError. Needed only when targets are named or the architecture has no default targets.
    skeleton_check: Callable | None = None
    # A rule on the sizes of the layers the method adapts: (shapes as (layer, in, out), recipe, model type) -> problems. Asked of
    # config.json for default targets (validate, no torch), of the skeleton for named ones, and of the model at wrap.
    size_check: Callable | None = None
    # A check of the run's step count, (recipe, total steps) raising PeftFtError (what it returns is not used): at the start of training,
    # and at validate when train.max_steps fixes the count.
    steps_check: Callable | None = None
    # State the method keeps outside the trainable weights and the optimizer, which a checkpoint must hold for
    # an exact resume: (model) -> (tensors, JSON-able dict), and (model, tensors, dict) -> None to put it back.
    training_state: Callable | None = None
    restore_training_state: Callable | None = None
    # Warnings of peft's save_pretrained that the method's own trained state sets off by design: (model) ->
    # {message regex: the note logged instead}; the save ignores those warnings only.
    expected_save_warnings: Callable | None = None

    @property
    def merges(self) -> bool:
        """Folds into the base weights (`peft-ft merge`): every weight-changing adapter, no prompt method."""
        return self.is_adapter and not self.prompt_learning


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"adapter method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def virtual_positions(recipe: Recipe) -> int:
    """How many positions the method prepends to the model's outputs: prompt tuning adds
    `num_virtual_tokens` input embeddings, so token-level labels and answer positions shift by
    that much (P-tuning likewise). Prefix tuning adds keys and values only: outputs keep the input's length."""
    return recipe.adapter.num_virtual_tokens if METHODS[recipe.adapter.method].prepends_tokens else 0


# --- target modules -----------------------------------------------------------------------------


def linear_layer_names(model) -> list[str]:
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def _no_default(model, recipe: Recipe) -> PeftFtError:
    return PeftFtError(
        f"{recipe.source}: adapter.target_modules: no default for model type {model.config.model_type!r} with adapter.method "
        f"{recipe.adapter.method!r}; set it to some of this model's linear layers: {', '.join(linear_layer_names(model))}"
    )


def _check_names_exist(model, names: list[str], key: str, recipe: Recipe) -> None:
    """Recipe-given names must each match a module (as peft matches them: the full name or a
    dotted suffix); peft's own error would not say which names the model has."""
    modules = [n for n, _ in model.named_modules()]
    missing = [t for t in names if not any(m == t or m.endswith("." + t) for m in modules)]
    if missing:
        raise PeftFtError(f"{recipe.source}: {key}: no module named {', '.join(map(repr, missing))} in this "
                          f"{model.config.model_type} model; its linear layers: {', '.join(linear_layer_names(model))}")
    backbone = getattr(model, "base_model_prefix", "")
    if key == "adapter.target_modules" and backbone and getattr(model, backbone, model) is not model:
        # The task head (classifier, qa_outputs) is outside the backbone and trains in full beside the adapter
        # (modules_to_save): peft then finds no module to adapt and raised NoMatchingPeftModuleError, a traceback.
        head = [t for t in names if not any((m == t or m.endswith("." + t)) and m.startswith(backbone + ".") for m in modules)]
        if head:
            raise PeftFtError(f"{recipe.source}: {key}: {', '.join(map(repr, head))} is the task head, which trains in "
                              f"full beside the adapter; target the base model's layers (such as "
                              f"{', '.join(LORA_TARGETS.get(model.config.model_type, ['query', 'value']))})")


def lora_targets(model, recipe: Recipe) -> list[str]:
    if recipe.adapter.target_modules:
        _check_names_exist(model, recipe.adapter.target_modules, "adapter.target_modules", recipe)
        return recipe.adapter.target_modules
    if model.config.model_type not in LORA_TARGETS:
        raise _no_default(model, recipe)
    return LORA_TARGETS[model.config.model_type]


def ia3_targets(model, recipe: Recipe) -> tuple[str | list[str], str | list[str]]:
    """(target_modules, feedforward_modules): the recipe's (validated to come as a pair), else the table's."""
    a = recipe.adapter
    if a.target_modules:
        _check_names_exist(model, a.target_modules, "adapter.target_modules", recipe)
        return a.target_modules, a.feedforward_modules
    if model.config.model_type not in IA3_TARGETS:
        raise _no_default(model, recipe)
    return IA3_TARGETS[model.config.model_type]


# --- wrapping -----------------------------------------------------------------------------------


def check_rank(model, targets: list[str] | str, recipe: Recipe) -> None:
    """A rank above a target layer's smaller side adds parameters and no expressiveness (and, unbounded,
    allocates gigabytes): refuse it, naming the narrowest layer. Targets matched as peft matches them."""
    import re

    import torch

    def targeted(name: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    sides = [(min(m.in_features, m.out_features), n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and targeted(n)]
    if sides and recipe.adapter.r > min(sides)[0]:
        side, name = min(sides)
        raise PeftFtError(f"{recipe.source}: adapter.r: {recipe.adapter.r} is more than the smallest side ({side}) of the target "
                          f"layer {name}; set adapter.r to at most {side}")


def _wrap_lora(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import EvaConfig, LoraConfig

    a = recipe.adapter
    targets = lora_targets(model, recipe)
    check_rank(model, targets, recipe)
    config = LoraConfig(
        task_type=peft_task_type,
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=targets,
        bias=a.bias,
        use_rslora=a.use_rslora,
        use_dora=a.use_dora,
        init_lora_weights=LORA_INITS[a.init],
        modules_to_save=list(heads),  # (a copy: peft appends to it) the task head trains and is saved inside the adapter file
        # rho = 1: every layer keeps rank r (EVA may otherwise move rank between layers once it has seen the data,
        # after the run has counted and logged its parameters)
        **({"eva_config": EvaConfig(rho=1.0)} if a.init == "eva" else {}),
    )
    # EVA: A starts as usual and is replaced by `_start_eva` from activations once the loop has the data
    # (not left empty on the meta device: the model is moved to its device before that).
    return _get_peft_model(model, config, recipe)


# `adapter.init` -> peft's `init_lora_weights`. PiSSA and OLoRA take A and B from a factorisation of
# each weight and leave the residual in the base; peft redoes that factorisation whenever the adapter
# is loaded (checked: reload and merge give the trained model's outputs), so the folder stays small.
LORA_INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "eva": "eva"}


def _wrap_ia3(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import IA3Config

    targets, feedforward = ia3_targets(model, recipe)
    config = IA3Config(task_type=peft_task_type, target_modules=targets, feedforward_modules=feedforward,
                       modules_to_save=list(heads))
    return _get_peft_model(model, config, recipe)


def _prompt_task_type(model, peft_task_type: str | None) -> str:
    if peft_task_type:
        return peft_task_type
    name = type(model).__name__
    for suffix, task_type in _PROMPT_TASK_TYPES.items():
        if name.endswith(suffix):
            if task_type == "QUESTION_ANS":
                log.info("prompt-learning methods on extractive QA go through peft's QA wrapper, which passes no "
                         "segment ids (token_type_ids) to the model; they are left out in training and prediction alike")
            return task_type
    raise PeftFtError(f"adapter.method: peft has no prompt-learning wrapper for {name}; use lora or ia3 with this model")


def check_position_room(model, recipe: Recipe) -> None:
    """Virtual tokens (and prefixes, whose positions come first) take position ids: the input plus
    them must fit the model's learned position table, or the embedding lookup fails mid-training."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if not limit or getattr(config, "relative_attention", False) and not getattr(config, "position_biased_input", True):
        return  # relative positions only (T5, DeBERTa without absolute embeddings): no table to overflow
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= (config.pad_token_id or 0) + 1  # their position ids start after the padding index
    nv = recipe.adapter.num_virtual_tokens
    if recipe.model.max_length + nv > limit:
        raise PeftFtError(
            f"{recipe.source}: model.max_length ({recipe.model.max_length}) + adapter.num_virtual_tokens ({nv}) exceeds "
            f"the {limit} positions this {config.model_type} model has; set model.max_length to at most {limit - nv} "
            f"or use fewer virtual tokens"
        )


def _prompt_dims(model) -> dict:
    """Sizes peft reads from the config, given explicitly: it does not find DistilBERT's (`dim`, `n_heads`)."""
    config = model.config
    return {"token_dim": config.hidden_size, "num_attention_heads": config.num_attention_heads, "num_layers": config.num_hidden_layers}


def _wrap_prompt_tuning(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import PromptTuningConfig, get_peft_model

    a = recipe.adapter
    check_position_room(model, recipe)
    init = {"prompt_tuning_init": "RANDOM"}
    if a.init_text:
        # peft tokenizes the text with the base model's tokenizer (only when training: a reload reads the saved prompt)
        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": a.init_text, "tokenizer_name_or_path": model.name_or_path}
    config = PromptTuningConfig(task_type=_prompt_task_type(model, peft_task_type), num_virtual_tokens=a.num_virtual_tokens,
                                modules_to_save=list(heads), **init, **_prompt_dims(model))
    return get_peft_model(model, config)


def route_prefixes(model):
    """Make a peft model hand its prefixes to the transformers model itself (prefix tuning on classification,
    token classification and QA heads, and seq2seq `generate`); returns the model. Harmless for other methods
    and models.

    peft 0.21 decides by the *signature* of the model's forward whether it takes `past_key_values`; transformers
    5.24 renamed that argument `cache` (the old name still works until 5.40), so peft refuses models that use a
    prefix perfectly well. This sends the same call peft itself makes when its check passes, under the name the
    backbone's forward takes. Support is decided by `prefix_problem`'s real forward, not by names.
    """
    if hasattr(model, "_prefix_tuning_forward") and hasattr(model, "get_prompt"):
        model._prefix_tuning_forward = types.MethodType(_prefix_forward, model)
    if (hasattr(model, "base_model_prepare_inputs_for_generation") and hasattr(model, "get_prompt")
            and "cache" in inspect.signature(model.base_model.forward).parameters):
        # before transformers' rename of `past_key_values` to `cache`, peft's own generation call is right
        model.prepare_inputs_for_generation = types.MethodType(_prefix_generation_inputs, model)
    return model


def _prefix_forward(self, input_ids=None, inputs_embeds=None, **kwargs):
    batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    backbone = self.base_model.get_submodule(self.transformer_backbone_name) if self.transformer_backbone_name else self.base_model
    name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    kwargs[name] = self.get_prompt(batch_size)
    return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


def _prefix_generation_inputs(self, *args, **kwargs):
    """peft's seq2seq `prepare_inputs_for_generation`, with the prefix handed over as the cache.

    On the first generation step peft puts the prefix under `past_key_values`, while transformers 5.24's own
    preparation already put an empty cache under `cache`; T5 then takes `cache` and drops the prefix, so
    `generate` answered as the bare base model. The prefix becomes the cache that generation goes on filling, as it
    was before the rename.

    Only on that first step: transformers passes `is_first_iteration` to the first step alone, and on the later ones
    peft looks for its prefix under `past_key_values`, finds none, takes the step for a first one and hands over a
    fresh prefix every step. Taking that one would throw away every token generated so far (each step saw the prefix
    and its own token only). tests/test_methods.py pins both: a prefix changes generation, and every generated
    step's scores equal the teacher-forced forward's.
    """
    inputs = type(self).prepare_inputs_for_generation(self, *args, **kwargs)
    prefix = inputs.pop("past_key_values", None)
    cache = inputs.get("cache")
    if prefix is not None and (cache is None or cache.get_seq_length() == 0):
        inputs["cache"] = prefix
    return inputs


def prefix_problem(model, peft_task_type: str | None) -> str | None:
    """Why `model`'s architecture cannot be prefix-tuned, found by a real forward; None when it can.

    A 1-token prefix is put in front of a short input; the architecture takes prefixes when the forward runs and
    its output moves with the prefix. A model that silently drops them (a forward taking **kwargs) is caught by
    the second condition. Run on a one-layer random copy of the architecture (`probe_model`): cheap, and it
    answers before a run folder exists.
    """
    import torch
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type=_prompt_task_type(model, peft_task_type), num_virtual_tokens=1, **_prompt_dims(model))
    probe = route_prefixes(get_peft_model(model, config)).eval()
    ids = torch.tensor([[1, 2, 3]])
    kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    try:
        with torch.no_grad():
            prefixed = probe(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            bare = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    except Exception as e:  # whatever the architecture raises: the answer is "no", with its reason
        return f"a forward with a prefix fails ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    first = lambda out: next(v for v in out.values() if isinstance(v, torch.Tensor))
    if torch.equal(first(prefixed), first(bare)):
        return "its forward ignores the prefix (no layer takes past keys and values)"
    return None


def probe_model(location: str, recipe: Recipe, auto_class: str, **kwargs):
    """A one-layer, randomly initialised model of `location`'s architecture: built from config.json alone."""
    import transformers

    quiet_transformers()
    config = load_config(location, recipe, **kwargs)
    for key in ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layers"):
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, 1)
    return getattr(transformers, auto_class).from_config(config)


def check_prefixes(location: str, recipe: Recipe, auto_class: str, peft_task_type: str | None) -> None:
    """Pre-flight of prefix tuning (run and validate): refuse an architecture that cannot take prefixes."""
    probe = probe_model(location, recipe, auto_class)
    problem = prefix_problem(probe, peft_task_type)
    if problem:
        raise PeftFtError(f"{recipe.source}: adapter.method: prefix_tuning cannot train {location} "
                          f"({probe.config.model_type}): {problem}. "
                          f"Use prompt_tuning, lora or ia3 with this model")


def _wrap_prefix_tuning(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import PrefixTuningConfig, get_peft_model

    a = recipe.adapter
    check_position_room(model, recipe)
    config = PrefixTuningConfig(task_type=_prompt_task_type(model, peft_task_type), num_virtual_tokens=a.num_virtual_tokens,
                                prefix_projection=a.prefix_projection, encoder_hidden_size=model.config.hidden_size,
                                modules_to_save=list(heads), **_prompt_dims(model))
    return route_prefixes(get_peft_model(model, config))


def _wrap_full(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --- the pre-flight: what `run` would refuse while wrapping, found on a weightless skeleton ------------


def needs_skeleton(recipe: Recipe, model_type: str | None) -> bool:
    """Whether the method's choices can only be checked against the model's modules: named targets or an
    architecture without a default target table (prefix tuning has its own pre-flight, a real forward).
    Other recipes skip it: building even a weightless model costs a torch import (seconds)."""
    method = METHODS[recipe.adapter.method]
    if method.skeleton_check is None:
        return False
    return bool(recipe.adapter.target_modules) or model_type not in (method.targets or {})


def check_on_skeleton(location: str, recipe: Recipe, auto_class: str, model_kwargs: dict) -> None:
    """Build the task model on the meta device (no weights read, nothing allocated) and ask it what
    wrapping would: the target modules exist (or the architecture has defaults), prefixes are taken."""
    import torch
    import transformers

    config = load_config(location, recipe, **model_kwargs)  # its failures (a misspelt hub id, custom code) as messages
    with torch.device("meta"):
        skeleton = getattr(transformers, auto_class).from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    METHODS[recipe.adapter.method].skeleton_check(skeleton, recipe)


# --- recipe checks (no torch unless an 8-bit recipe needs to ask it) -------------------------------


def cuda_available() -> bool:
    """Without an NVIDIA driver there is no CUDA whatever torch says: answered without importing torch."""
    if not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")):
        return False
    import torch

    return torch.cuda.is_available()


def _validate_8bit(recipe: Recipe) -> list[str]:
    """8-bit needs CUDA and bitsandbytes; checked at validation so a recipe never starts a run it cannot finish."""
    import importlib.util

    if not recipe.model.load_in_8bit:
        return []
    how = "remove model.load_in_8bit to train in float32 here, or run the recipe on a machine with a CUDA GPU"
    if not METHODS[recipe.adapter.method].eight_bit:
        able = [m.name for m in METHODS.values() if m.eight_bit]
        return [f"model.load_in_8bit: for adapter.method {' or '.join(able)}, not {recipe.adapter.method!r}; "
                f"remove the key or change the method"]
    if recipe.train.device == "cpu":
        return [f"model.load_in_8bit: needs a CUDA GPU but train.device = \"cpu\"; {how}"]
    if not cuda_available():
        return [f"model.load_in_8bit: an 8-bit base needs a CUDA GPU and this machine has none; {how}"]
    if importlib.util.find_spec("bitsandbytes") is None:
        # bitsandbytes is the optional [cuda] extra: installed everywhere, it prints a kernel warning on every CPU load.
        return ["model.load_in_8bit: needs bitsandbytes, which peft-ft installs only with its [cuda] extra: "
                "pip install -c requirements.lock 'peft-ft[cuda]' (or remove the key)"]
    return []


def _validate_ia3(recipe: Recipe) -> list[str]:
    a, problems = recipe.adapter, _validate_8bit(recipe)
    if a.target_modules and "adapter.feedforward_modules" not in recipe.explicit:
        problems.append("adapter.feedforward_modules: required with adapter.target_modules for ia3: list which of the "
                        "targets are feed-forward layers (scaled on their input), or [] for none")
    elif a.feedforward_modules and not a.target_modules:
        problems.append("adapter.feedforward_modules: set adapter.target_modules too (the architecture's default "
                        "targets are regular expressions, which a list cannot extend)")
    extra = sorted(set(a.feedforward_modules) - set(a.target_modules)) if a.target_modules else []
    if extra:
        problems.append(f"adapter.feedforward_modules: {', '.join(extra)} not in adapter.target_modules; "
                        f"feed-forward modules are a subset of the targets")
    return problems


# --- the other peft methods -------------------------------------------------------------------------
# LoRA's target table serves every method that adapts linear layers; LN-tuning trains LayerNorms.
LN_TARGETS: dict[str, list[str]] = {
    **{t: ["LayerNorm"] for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta-v2")},
    "distilbert": ["sa_layer_norm", "output_layer_norm"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
}


@dataclass(frozen=True)
class TrainingStart:
    """What a method's `on_train_start` may need: the tokenized training rows and the step count."""
    features: list
    total_steps: int
    batch_size: int
    pad_id: int
    device: object


def ln_targets(model, recipe: Recipe) -> list[str]:
    if recipe.adapter.target_modules:
        _check_names_exist(model, recipe.adapter.target_modules, "adapter.target_modules", recipe)
        return recipe.adapter.target_modules
    if model.config.model_type not in LN_TARGETS:
        norms = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "norm" in type(m).__name__.lower()})
        raise PeftFtError(f"{recipe.source}: adapter.target_modules: no default for model type {model.config.model_type!r} "
                          f"with ln_tuning; set it to some of this model's normalisation layers: {', '.join(norms) or 'none found'}")
    return LN_TARGETS[model.config.model_type]


def targeted_linears(model, targets: list[str], heads: list[str]) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of each linear layer the targets match (as peft matches a list)."""
    import torch

    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            if not any(part in heads for part in name.split(".")):
                found.append((name, module.in_features, module.out_features))
    return found


def _get_peft_model(model, config, recipe: Recipe, **kwargs):
    """peft's own shape checks (block sizes, ranks) raise ValueError: said as a recipe error instead."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, config, **kwargs)
    except ValueError as e:
        raise PeftFtError(f"{recipe.source}: adapter.method {recipe.adapter.method!r}: peft refuses this configuration "
                          f"for the {model.config.model_type} model: {e}") from None


def _wrap_adalora(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import AdaLoraConfig

    a = recipe.adapter
    # total_step, tinit and tfinal are set by `_start_adalora` once the step count is known; peft insists
    # on a valid schedule at construction, hence the placeholder.
    config = AdaLoraConfig(task_type=peft_task_type, init_r=a.init_r, target_r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                           target_modules=lora_targets(model, recipe), total_step=2, tinit=0, tfinal=0,
                           deltaT=a.delta_t, modules_to_save=list(heads))
    return _get_peft_model(model, config, recipe)


def adalora_schedule(recipe: Recipe, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) in steps; the budget phase between them must hold at least one step."""
    a = recipe.adapter
    tinit, tfinal = int(a.tinit * total_steps), max(1, int(a.tfinal * total_steps))
    if tinit >= total_steps - tfinal:
        raise PeftFtError(f"{recipe.source}: adapter.tinit ({a.tinit}) and adapter.tfinal ({a.tfinal}) leave no step of "
                          f"{total_steps} for AdaLoRA to allocate its rank budget (tinit {tinit} steps, tfinal {tfinal}); "
                          f"train more steps or lower them")
    return tinit, tfinal


def _start_adalora(model, recipe: Recipe, start: TrainingStart):
    """AdaLoRA's schedule needs the run's step count, and its budget is reallocated after every step
    from the gradients (before they are zeroed): peft's `update_and_allocate`."""
    tuner = model.base_model
    config = tuner.peft_config[tuner.trainable_adapter_name]
    config.tinit, config.tfinal = adalora_schedule(recipe, start.total_steps)
    tuner.rankallocator.set_total_step(start.total_steps)  # the allocator reads the same config object
    log.info("AdaLoRA: %d steps, ranks cut from %d to %d on average between steps %d and %d", start.total_steps,
             recipe.adapter.init_r, recipe.adapter.r, config.tinit, start.total_steps - config.tfinal)
    return tuner.update_and_allocate


_ALLOCATOR = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # peft's RankAllocator: the smoothed importance of each weight


def _adalora_state(model) -> tuple[dict, dict]:
    """AdaLoRA's rank allocator (importance scores smoothed over every step so far) and the rank pattern it
    has settled on: without them a resumed run allocates from fresh scores, and one resumed after the budget
    was final masks with no pattern at all."""
    tuner = model.base_model
    allocator = tuner.rankallocator
    tensors = {f"{kind}/{name}": t.detach().contiguous() for kind in _ALLOCATOR for name, t in getattr(allocator, kind).items()}
    return tensors, {"rank_pattern": tuner.peft_config[tuner.trainable_adapter_name].rank_pattern}


def _adalora_save_warnings(model) -> dict[str, str]:
    """AdaLoRA's budget may cut a layer to rank 0: its lora_A and lora_B are saved with a zero-sized dimension and
    reload so (adapter_config.json's rank_pattern). peft 0.21's save warns of exactly such tensors as DeepSpeed ZeRO-3 /
    FSDP shards saved ungathered; the count of them tells the two apart (an ungathered save empties every layer)."""
    tuner = model.base_model
    pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern or {}
    cut = [name for name, kept in pattern.items() if not any(kept)]
    if not cut:
        return {}
    return {rf".*: {2 * len(cut)} LoRA tensor\(s\) have invalid shape": (
        f"AdaLoRA cut {len(cut)} of {len(pattern)} adapted layers to rank 0 ({cut[0].split('.lora_E')[0]}"
        f"{' ...' if len(cut) > 1 else ''}): their lora_A / lora_B are saved empty and load back so")}


def _restore_adalora(model, tensors: dict, saved: dict) -> None:
    tuner = model.base_model
    allocator = tuner.rankallocator
    for kind in _ALLOCATOR:
        setattr(allocator, kind, {name.split("/", 1)[1]: t for name, t in tensors.items() if name.startswith(f"{kind}/")})
    tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = saved.get("rank_pattern")


EVA_BATCHES = 16  # training batches EVA reads
# peft cycles over those batches until every layer's SVD has settled, with no limit of its own. On real text
# that takes a few passes (MiniLM on CoNLL: 30 forward passes over 16 batches of 16); on data whose layer inputs
# have no dominant directions it may never end (a 32-wide toy BERT on 2 batches of NER toys: 4,280 forward
# passes, 2,140 over each batch). The limit counts passes over the batches.
EVA_PASSES = 100


class _EvaUnsettled(Exception):
    """Raised from inside peft's EVA loop when its forward-pass budget is spent."""


def _start_eva(model, recipe: Recipe, start: TrainingStart):
    """EVA initialises A from the top right-singular vectors of each layer's input activations on
    training data; run before the optimizer is built (the matrices are replaced)."""
    import torch
    from peft import initialize_lora_eva_weights

    rows = start.features[: EVA_BATCHES * start.batch_size]
    batches = []
    for i in range(0, max(1, len(rows) - start.batch_size + 1), start.batch_size):  # full batches (a short last one is dropped)
        batch = pad_batch(rows[i:i + start.batch_size], start.pad_id)
        batch.pop("labels", None)
        batches.append({k: v.to(start.device) for k, v in batch.items()})
    was_training = model.training
    model.eval()  # no dropout in the statistics
    try:
        with torch.no_grad():
            initialize_lora_eva_weights(model, batches, forward_fn=_bounded_forward(EVA_PASSES * len(batches)),
                                        prepare_layer_inputs_fn=_eva_layer_inputs, show_progress_bar=False)
    except _EvaUnsettled:
        read = sum(len(b["input_ids"]) for b in batches)
        raise PeftFtError(
            f"{recipe.source}: adapter.init = \"eva\": the SVDs of the layer inputs did not settle within {EVA_PASSES} "
            f"passes over the first {len(batches)} training batch{'es' if len(batches) > 1 else ''} ({read} rows); "
            f"on real text they settle in a few. Train on more rows, raise train.batch_size, lower adapter.r, "
            f"or use adapter.init = \"default\"") from None
    model.train(was_training)
    log.info("EVA: LoRA A matrices initialised from %d training rows", len(rows))
    return None


def _bounded_forward(limit: int):
    """peft's forward step for EVA (`model(**inputs)`), refusing to run more than `limit` times."""
    calls = 0

    def forward(model, inputs):
        nonlocal calls
        calls += 1
        if calls > limit:
            raise _EvaUnsettled
        return model(**inputs)

    return forward


def _eva_layer_inputs(layer_input, model_input, layer_name):
    """The real tokens' inputs of a layer (peft's default), or every row's for a layer that sees one
    vector per row (BERT's pooler, whose `dense` LoRA targets too): peft's default fails on those."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.contiguous() if x.dim() == 2 else x[model_input.T.unbind()]  # (the pooler reads a strided slice)


def _start_lora(model, recipe: Recipe, start: TrainingStart):
    return _start_eva(model, recipe, start) if recipe.adapter.init == "eva" else None


def _loraplus_scale(recipe: Recipe):
    """LoRA+ (Hayou et al. 2024): B learns `loraplus_lr_ratio` times faster than A."""
    ratio = recipe.adapter.loraplus_lr_ratio
    if not ratio:
        return None
    return lambda name: ratio if ".lora_B." in name or ".lora_embedding_B." in name else 1.0


def _wrap_vera(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import VeraConfig

    # save_projection: the shared random matrices go into the adapter file, so a reload never depends
    # on the random generator reproducing them.
    config = VeraConfig(task_type=peft_task_type, r=recipe.adapter.vera_r, target_modules=lora_targets(model, recipe),
                        save_projection=True, modules_to_save=list(heads))
    return _get_peft_model(model, config, recipe)


def _wrap_loha(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import LoHaConfig

    a = recipe.adapter
    config = LoHaConfig(task_type=peft_task_type, r=a.r, alpha=a.alpha, rank_dropout=a.dropout,
                        target_modules=lora_targets(model, recipe), modules_to_save=list(heads))
    return _get_peft_model(model, config, recipe)


def _wrap_lokr(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import LoKrConfig

    a = recipe.adapter
    config = LoKrConfig(task_type=peft_task_type, r=a.r, alpha=a.alpha, rank_dropout=a.dropout,
                        target_modules=lora_targets(model, recipe), modules_to_save=list(heads))
    return _get_peft_model(model, config, recipe)


# --- layer sizes: one rule per method, asked of the loaded model (run), the skeleton (named targets) and config.json --


# The linear layers LoRA's default targets adapt, as (layer, input size, output size) from config.json's keys, by
# `config.model_type`: validate checks a block size or frequency count against them without building a model (torch
# alone is seconds). tests/test_methods.py compares every entry with the real model's layers.
_BERT_LAYERS = lambda c: [("query/key/value/dense", c["hidden_size"], c["hidden_size"]),
                          ("intermediate.dense", c["hidden_size"], c["intermediate_size"]),
                          ("output.dense", c["intermediate_size"], c["hidden_size"])]
DEFAULT_TARGET_SHAPES: dict[str, Callable[[dict], list[tuple[str, int, int]]]] = {
    **{t: _BERT_LAYERS for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta-v2")},
    "distilbert": lambda c: [("q_lin/k_lin/v_lin/out_lin", c["dim"], c["dim"]), ("lin1", c["dim"], c["hidden_dim"]),
                             ("lin2", c["hidden_dim"], c["dim"])],
    **{t: (lambda c: [("q/v", c["d_model"], c["num_heads"] * c["d_kv"])]) for t in ("t5", "mt5")},
}


def default_target_shapes(config: dict, model_type: str) -> list[tuple[str, int, int]] | None:
    """The default targets' layer shapes from config.json; None when the table does not know the architecture or
    its config lacks a size (then the model answers, at run)."""
    try:
        return DEFAULT_TARGET_SHAPES[model_type](config) if model_type in DEFAULT_TARGET_SHAPES else None
    except (KeyError, TypeError):
        return None


def _divides(key: str, *, outputs: bool = False):
    """A rule: adapter.<key> divides every adapted layer's input (and output) size."""
    def rule(shapes, recipe: Recipe, kind: str) -> list[str]:
        size = getattr(recipe.adapter, key)
        bad = [f"{n} ({i}{f' x {o}' if outputs else ''})" for n, i, o in shapes if i % size or (outputs and o % size)]
        return _size_problem(key, size, "must divide every adapted layer's input" + (" and output sizes" if outputs else " size"),
                             bad, kind)
    return rule


def _fourierft_sizes(shapes, recipe: Recipe, kind: str) -> list[str]:
    n = recipe.adapter.n_frequency
    return _size_problem("n_frequency", n, "must be at most each adapted layer's input x output size",
                         [f"{name} ({i} x {o})" for name, i, o in shapes if i * o < n], kind)


def _vblora_sizes(shapes, recipe: Recipe, kind: str) -> list[str]:
    if recipe.adapter.vector_length:
        return _divides("vector_length", outputs=True)(shapes, recipe, kind)
    if vector_length_for(shapes) is None:
        sizes = sorted({s for _, i, o in shapes for s in (i, o)})
        return [f"adapter.vector_length: no length of 8 or more divides every adapted layer's sizes "
                f"({', '.join(map(str, sizes))}); set adapter.vector_length or adapter.target_modules"]
    return []


def _size_problem(key: str, value: int, rule: str, bad: list[str], kind: str) -> list[str]:
    if not bad:
        return []
    return [f"adapter.{key} = {value}: {rule}, which {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} of this {kind} "
            f"model do not allow; choose another value or narrow adapter.target_modules"]


def _check_sizes(model, recipe: Recipe, heads: list[str]) -> None:
    """The method's size rule on the layers the adapter will wrap (run, and the skeleton for named targets)."""
    rule = METHODS[recipe.adapter.method].size_check
    problems = rule(targeted_linears(model, lora_targets(model, recipe), heads), recipe, model.config.model_type)
    if problems:
        raise PeftFtError(f"{recipe.source}: " + f"\n{recipe.source}: ".join(problems))


def _sizes_fit(config: dict, recipe: Recipe, kind: str) -> list[str]:
    """The method's size rule against config.json, for the default targets of an architecture the table knows."""
    shapes = None if recipe.adapter.target_modules else default_target_shapes(config, kind)
    if shapes is None:
        return []
    return METHODS[recipe.adapter.method].size_check(shapes, recipe, kind)


def _sized_skeleton_check(skeleton, recipe: Recipe) -> None:
    """Named targets exist, are not the head, and fit the method's size rule (the head: the task model's children
    beside its backbone, as a load finds them freshly made)."""
    backbone = getattr(skeleton, skeleton.base_model_prefix, None)
    heads = [n for n, m in skeleton.named_children() if m is not backbone] if backbone is not None else []
    _check_sizes(skeleton, recipe, heads)


def _wrap_oft(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import OFTConfig

    a = recipe.adapter
    _check_sizes(model, recipe, heads)
    config = OFTConfig(task_type=peft_task_type, r=0, oft_block_size=a.oft_block_size, target_modules=lora_targets(model, recipe),
                       modules_to_save=list(heads))
    return _get_peft_model(model, config, recipe)


def _wrap_boft(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import BOFTConfig

    a = recipe.adapter
    _check_sizes(model, recipe, heads)
    config = BOFTConfig(task_type=peft_task_type, boft_block_size=a.boft_block_size, boft_n_butterfly_factor=a.boft_butterfly_factor,
                        target_modules=lora_targets(model, recipe), modules_to_save=list(heads))
    return _get_peft_model(model, config, recipe)


def _wrap_ln_tuning(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import LNTuningConfig

    config = LNTuningConfig(task_type=peft_task_type, target_modules=ln_targets(model, recipe), modules_to_save=list(heads))
    return _get_peft_model(model, config, recipe)


def _wrap_fourierft(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import FourierFTConfig

    a = recipe.adapter
    _check_sizes(model, recipe, heads)
    config = FourierFTConfig(task_type=peft_task_type, n_frequency=a.n_frequency, scaling=a.fourier_scaling,
                             target_modules=lora_targets(model, recipe), modules_to_save=list(heads))
    return _get_peft_model(model, config, recipe)


def vector_length_for(shapes) -> int | None:
    """The largest of 256, 128, ..., 8 dividing every adapted layer's input and output sizes; None if none does."""
    sizes = {s for _, i, o in shapes for s in (i, o)}
    return next((length for length in (256, 128, 64, 32, 16, 8) if all(s % length == 0 for s in sizes)), None)


def _wrap_vblora(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import VBLoRAConfig

    a = recipe.adapter
    _check_sizes(model, recipe, heads)  # also: some automatic vector length fits
    targets = lora_targets(model, recipe)
    length = a.vector_length or vector_length_for(targeted_linears(model, targets, heads))
    config = VBLoRAConfig(task_type=peft_task_type, r=a.r, num_vectors=a.num_vectors, vector_length=length, topk=a.topk,
                          target_modules=targets, modules_to_save=list(heads))
    return _get_peft_model(model, config, recipe)


def _wrap_p_tuning(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import PromptEncoderConfig

    check_position_room(model, recipe)
    config = PromptEncoderConfig(task_type=_prompt_task_type(model, peft_task_type), num_virtual_tokens=recipe.adapter.num_virtual_tokens,
                                 encoder_hidden_size=model.config.hidden_size if hasattr(model.config, "hidden_size") else None,
                                 modules_to_save=list(heads), **_prompt_dims(model))
    return _get_peft_model(model, config, recipe)


def _validate_lora(recipe: Recipe) -> list[str]:
    a, problems = recipe.adapter, _validate_8bit(recipe)
    if a.init == "eva" and recipe.task.type == "seq2seq":
        problems.append("adapter.init: \"eva\" is not available for seq2seq: peft's EVA picks the tokens of each layer's "
                        "input by the encoder's attention mask, which does not fit T5's decoder layers; use \"default\", "
                        "\"pissa\" or \"olora\"")
    if recipe.model.load_in_8bit and a.init in ("pissa", "olora", "eva"):
        problems.append(f"adapter.init: {a.init!r} factorises the base weights, which an 8-bit base does not allow here; "
                        f"use \"default\" or \"gaussian\", or remove model.load_in_8bit")
    return problems


def _rank_fits(config: dict, recipe: Recipe, kind: str) -> list[str]:
    """A LoRA rank within the layers' width (config.json's hidden size)."""
    width = hidden_width(config)
    if width and recipe.adapter.r > width:
        return [f"adapter.r: {recipe.adapter.r} is more than this {kind} model's hidden size ({width}): a rank "
                f"cannot exceed the layers it adapts; set it to at most {width} (8-64 is usual)"]
    return []


def _positions_fit(config: dict, recipe: Recipe, kind: str) -> list[str]:
    """Virtual tokens (and prefixes, whose positions come first) take positions of the model's table too."""
    limit, virtual = position_limit(config), recipe.adapter.num_virtual_tokens
    if limit and recipe.model.max_length <= limit < recipe.model.max_length + virtual:
        return [f"model.max_length ({recipe.model.max_length}) + adapter.num_virtual_tokens ({virtual}) exceeds the "
                f"{limit} positions this {kind} model has; set model.max_length to at most {limit - virtual} or use "
                f"fewer virtual tokens"]
    return []


def _lora_skeleton_check(skeleton, recipe: Recipe) -> None:
    check_rank(skeleton, lora_targets(skeleton, recipe), recipe)


def _ia3_skeleton_check(skeleton, recipe: Recipe) -> None:
    ia3_targets(skeleton, recipe)


def _targets_skeleton_check(skeleton, recipe: Recipe) -> None:
    """The methods that adapt LoRA's target layers: the named targets exist and are not the task head (validate passed
    a LoHa target that does not exist, and run refused it after loading the model)."""
    lora_targets(skeleton, recipe)


def _validate_vblora(recipe: Recipe) -> list[str]:
    a, problems = recipe.adapter, _validate_8bit(recipe)
    if a.topk > a.num_vectors:  # known from the recipe alone: run refused it only after loading the model
        problems.append(f"adapter.topk ({a.topk}) exceeds adapter.num_vectors ({a.num_vectors}): each vector is mixed "
                        f"from the top k of the bank; lower adapter.topk or raise adapter.num_vectors")
    return problems


def _validate_prefix_tuning(recipe: Recipe) -> list[str]:
    problems = _validate_8bit(recipe)
    if recipe.train.activation_checkpointing:
        problems.append("train.activation_checkpointing: prefix tuning's virtual keys and values are dropped by "
                        "transformers' checkpointed layers (only the head would train); set it to false")
    return problems


def _validate_full(recipe: Recipe) -> list[str]:
    if recipe.model.load_in_8bit:
        return ["model.load_in_8bit: an 8-bit base cannot be fully fine-tuned; use adapter.method = \"lora\""]
    return []


def _validate_adalora(recipe: Recipe) -> list[str]:
    a, problems = recipe.adapter, _validate_8bit(recipe)
    if a.init_r < a.r:
        problems.append(f"adapter.init_r ({a.init_r}) is below adapter.r ({a.r}): AdaLoRA starts at init_r and cuts "
                        f"ranks down to r on average; raise init_r")
    if a.tinit + a.tfinal >= 1:
        problems.append(f"adapter.tfinal: adapter.tinit + adapter.tfinal ({a.tinit} + {a.tfinal}) must stay below 1, "
                        f"leaving steps for AdaLoRA's budget phase")
    return problems


register_method(Method(
    "lora", is_adapter=True, targets=LORA_TARGETS, default_lr=5e-4, wrap=_wrap_lora, validate=_validate_lora,
    on_train_start=_start_lora, lr_scale=_loraplus_scale, eight_bit=True, config_check=_rank_fits, skeleton_check=_lora_skeleton_check,
    summary="low-rank update B A on each target linear layer (options: use_dora, use_rslora, init, loraplus_lr_ratio)",
    lr_reason="the shipped SciEntsBank and CoNLL recipes train at it (the LoRA paper used rates of this order on GLUE)"))
register_method(Method(
    "prompt_tuning", is_adapter=True, default_lr=2e-2, wrap=_wrap_prompt_tuning, validate=_validate_8bit, prompt_learning=True,
    prepends_tokens=True, config_check=_positions_fit,
    summary="trained virtual input embeddings prepended to every input",
    lr_reason="soft prompts need far larger rates than weights (the prompt-tuning paper used 0.3 with Adafactor)"))
register_method(Method(
    "prefix_tuning", is_adapter=True, default_lr=1e-2, wrap=_wrap_prefix_tuning, validate=_validate_prefix_tuning, prompt_learning=True,
    preflight=check_prefixes, config_check=_positions_fit,
    preflight_passes=frozenset({"bert", "roberta", "xlm-roberta", "electra", "t5"}),
    summary="trained key/value prefixes in every attention layer",
    lr_reason="prefixes, like prompts, need larger rates than weights; below prompt tuning's as they act in every layer"))
register_method(Method(
    "ia3", is_adapter=True, targets=IA3_TARGETS, default_lr=5e-3, wrap=_wrap_ia3, validate=_validate_ia3, eight_bit=True,
    skeleton_check=_ia3_skeleton_check,
    summary="learned scaling vectors on keys, values and feed-forward inputs",
    lr_reason="scaling vectors start at 1 and move slowly: the order of the T-Few recipe's 3e-3"))
register_method(Method(
    "full", is_adapter=False, default_lr=5e-5, wrap=_wrap_full, validate=_validate_full,
    summary="every weight trains; the whole model is saved",
    lr_reason="the top of BERT's fine-tuning range (2e-5..5e-5)"))
register_method(Method(
    "adalora", is_adapter=True, targets=LORA_TARGETS, default_lr=5e-4, wrap=_wrap_adalora, validate=_validate_adalora, on_train_start=_start_adalora,
    skeleton_check=_targets_skeleton_check, steps_check=adalora_schedule,
    training_state=_adalora_state, restore_training_state=_restore_adalora, expected_save_warnings=_adalora_save_warnings,
    summary="LoRA in SVD form whose per-layer ranks are cut from init_r to r on average during training (the loop drives "
            "the budget schedule: tinit, tfinal, delta_t)",
    lr_reason="same parametrisation scale as LoRA: LoRA's default (the AdaLoRA paper used 5e-4..1e-3 on GLUE)"))
register_method(Method(
    "vera", is_adapter=True, targets=LORA_TARGETS, default_lr=5e-3, wrap=_wrap_vera, validate=_validate_8bit,
    skeleton_check=_targets_skeleton_check,
    summary="frozen random low-rank projections shared by every layer (rank vera_r), trained per-layer scaling vectors",
    lr_reason="trains scaling vectors like IA3, so IA3's rate (the VeRA paper used 4e-3..1e-2 on GLUE); untuned here"))
register_method(Method(
    "loha", is_adapter=True, targets=LORA_TARGETS, default_lr=5e-4, wrap=_wrap_loha, validate=_validate_8bit,
    skeleton_check=_targets_skeleton_check,
    summary="low-rank Hadamard product update (two LoRA pairs multiplied elementwise) on each target layer",
    lr_reason="LoRA-like factors at the same rank and scale: LoRA's default; untuned here"))
register_method(Method(
    "lokr", is_adapter=True, targets=LORA_TARGETS, default_lr=5e-4, wrap=_wrap_lokr, validate=_validate_8bit,
    skeleton_check=_targets_skeleton_check,
    summary="Kronecker-product update (a small factor x a low-rank factor) on each target layer",
    lr_reason="LoRA-like factors at the same rank and scale: LoRA's default; untuned here"))
register_method(Method(
    "oft", is_adapter=True, targets=LORA_TARGETS, default_lr=5e-4, wrap=_wrap_oft, validate=_validate_8bit,
    size_check=_divides("oft_block_size"),
    skeleton_check=_sized_skeleton_check, config_check=_sizes_fit,
    summary="block-diagonal orthogonal rotation of each target layer's input (blocks of oft_block_size)",
    lr_reason="no encoder default we could verify; LoRA's rate, untuned here"))
register_method(Method(
    "boft", is_adapter=True, targets=LORA_TARGETS, default_lr=5e-4, wrap=_wrap_boft, validate=_validate_8bit,
    size_check=_divides("boft_block_size"),
    skeleton_check=_sized_skeleton_check, config_check=_sizes_fit,
    summary="orthogonal rotation built from butterfly factors of small blocks (boft_block_size, boft_butterfly_factor)",
    lr_reason="no encoder default we could verify; LoRA's rate, untuned here"))
register_method(Method(
    "ln_tuning", is_adapter=True, targets=LN_TARGETS, default_lr=5e-3, wrap=_wrap_ln_tuning, validate=_validate_8bit,
    summary="trains a copy of every LayerNorm (gain and bias) and nothing else besides the head",
    lr_reason="gains and biases near 1 and 0, like IA3's vectors: IA3's rate; untuned here"))
register_method(Method(
    "fourierft", is_adapter=True, targets=LORA_TARGETS, default_lr=5e-2, wrap=_wrap_fourierft, validate=_validate_8bit,
    size_check=_fourierft_sizes,
    skeleton_check=_sized_skeleton_check, config_check=_sizes_fit,
    summary="n_frequency learned spectral coefficients per layer at fixed random frequencies; the update is their inverse 2-D DFT",
    lr_reason="few coefficients with a large scale need large rates: the FourierFT paper's GLUE range (5e-2..1e-1 for "
              "RoBERTa-base, scaling 100-150); untuned here"))
register_method(Method(
    "vblora", is_adapter=True, targets=LORA_TARGETS, default_lr=1e-3, wrap=_wrap_vblora, validate=_validate_vblora,
    size_check=_vblora_sizes,
    skeleton_check=_sized_skeleton_check, config_check=_sizes_fit,
    summary="every layer's low-rank factors are mixed (top-k) from one shared bank of vectors",
    lr_reason="between LoRA's rate and the higher one VB-LoRA's bank usually gets; untuned here"))
register_method(Method(
    "p_tuning", is_adapter=True, default_lr=1e-2, wrap=_wrap_p_tuning, validate=_validate_8bit, prompt_learning=True,
    prepends_tokens=True,
    summary="virtual input embeddings produced by a small trained MLP (P-tuning)",
    lr_reason="between prefix tuning's and prompt tuning's defaults; the MLP steadies it; untuned here"))


def unsupported(method: Method, recipe: Recipe, model, location: str, auto_class: str, peft_task_type: str | None) -> str | None:
    """Why `method` cannot serve this recipe's model (a skeleton on the meta device will do, as the method's own
    pre-flight builds what it needs from `location`), or None."""
    if method.targets is not None and not recipe.adapter.target_modules and model.config.model_type not in method.targets:
        return f"no default target modules for model type {model.config.model_type!r} (set adapter.target_modules)"
    if method.preflight:
        try:
            method.preflight(location, recipe, auto_class, peft_task_type)
        except PeftFtError as e:
            return str(e).removeprefix(f"{recipe.source}: ")
    if method.prompt_learning:
        try:
            check_position_room(model, recipe)
        except PeftFtError as e:
            return str(e).removeprefix(f"{recipe.source}: ")
    return None


def explain_methods() -> str:
    """One record per method for `peft-ft explain adapter`."""
    lines = ["adapter.method values:"]
    for m in METHODS.values():
        merge = "merges" if m.merges else ("cannot merge (virtual tokens, not a weight change)" if m.is_adapter else "no adapter")
        lines.append(f"  {m.name}: {m.summary}")
        lines.append(f"      default lr {m.default_lr:g}: {m.lr_reason}; {merge}")
    return "\n".join(lines)
