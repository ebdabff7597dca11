"""Adapter methods, registered by name: how each wraps a loaded model and what it checks in a recipe.

Every method gets the task head's module names (`heads`, read from the loading report by
`peft_ft.models.load_model`) and puts them in peft's `modules_to_save`, so the head trains and is
saved inside the adapter file whatever the method.

Light at import (no torch); peft is imported when a method actually wraps a model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from peft_ft.errors import PeftFtError
from peft_ft.schema import Recipe

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

EIGHT_BIT_METHODS = ("lora", "ia3")


@dataclass(frozen=True)
class Method:
    name: str
    is_adapter: bool  # False: every weight trains and the whole model is saved
    default_lr: float
    wrap: Callable  # (model, recipe, heads: list[str], peft_task_type: str | None) -> model
    validate: Callable[[Recipe], list[str]] = lambda recipe: []
    prompt_learning: bool = False  # virtual tokens or prefixes: cannot be merged into the base


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"adapter method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def virtual_positions(recipe: Recipe) -> int:
    """How many positions the method prepends to the model's outputs: prompt tuning adds
    `num_virtual_tokens` input embeddings, so token-level labels and answer positions shift by
    that much. Prefix tuning adds keys and values only: outputs keep the input's length."""
    return recipe.adapter.num_virtual_tokens if recipe.adapter.method == "prompt_tuning" else 0


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
    from peft import LoraConfig, get_peft_model

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
        modules_to_save=list(heads),  # (a copy: peft appends to it) the task head trains and is saved inside the adapter file
    )
    return get_peft_model(model, config)


def _wrap_ia3(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import IA3Config, get_peft_model

    targets, feedforward = ia3_targets(model, recipe)
    config = IA3Config(task_type=peft_task_type, target_modules=targets, feedforward_modules=feedforward,
                       modules_to_save=list(heads))
    return get_peft_model(model, config)


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


def supports_prefixes(model) -> bool:
    """Prefix tuning hands the layers `past_key_values`; as peft checks it: the model's or its backbone's forward takes them."""
    import inspect

    backbone = getattr(model, model.base_model_prefix, model)
    return any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone))


def _wrap_prefix_tuning(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import PrefixTuningConfig, get_peft_model

    a = recipe.adapter
    if not supports_prefixes(model):
        raise PeftFtError(
            f"{recipe.source}: adapter.method: prefix_tuning needs a model whose layers take past keys and values; "
            f"{model.config.model_type} models do not. Use prompt_tuning, lora or ia3 with this model"
        )
    check_position_room(model, recipe)
    config = PrefixTuningConfig(task_type=_prompt_task_type(model, peft_task_type), num_virtual_tokens=a.num_virtual_tokens,
                                prefix_projection=a.prefix_projection, encoder_hidden_size=model.config.hidden_size,
                                modules_to_save=list(heads), **_prompt_dims(model))
    return get_peft_model(model, config)


def _wrap_full(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --- the pre-flight: what `run` would refuse while wrapping, found on a weightless skeleton ------------


def needs_skeleton(recipe: Recipe, model_type: str | None) -> bool:
    """Whether the method's choices can only be checked against the model's modules: named targets, prefix
    tuning (does the model take past keys?), or an architecture without a default target table. Other
    recipes skip it: building even a weightless model costs a torch import (seconds)."""
    a = recipe.adapter
    if a.method == "prefix_tuning" or (a.target_modules and a.method in ("lora", "ia3")):
        return True
    table = {"lora": LORA_TARGETS, "ia3": IA3_TARGETS}.get(a.method)
    return table is not None and model_type not in table


def check_on_skeleton(location: str, recipe: Recipe, auto_class: str, model_kwargs: dict) -> None:
    """Build the task model on the meta device (no weights read, nothing allocated) and ask it what
    wrapping would: the target modules exist (or the architecture has defaults), prefixes are taken."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(location, trust_remote_code=recipe.model.trust_remote_code,
                                                     revision=recipe.model.revision or None, **model_kwargs)
    with torch.device("meta"):
        skeleton = getattr(transformers, auto_class).from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    method = recipe.adapter.method
    if method == "lora":
        check_rank(skeleton, lora_targets(skeleton, recipe), recipe)
    elif method == "ia3":
        ia3_targets(skeleton, recipe)
    elif method == "prefix_tuning" and not supports_prefixes(skeleton):
        raise PeftFtError(
            f"{recipe.source}: adapter.method: prefix_tuning needs a model whose layers take past keys and values; "
            f"{skeleton.config.model_type} models do not. Use prompt_tuning, lora or ia3 with this model"
        )


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
    if recipe.adapter.method not in EIGHT_BIT_METHODS:
        return [f"model.load_in_8bit: for adapter.method {' or '.join(EIGHT_BIT_METHODS)}, not {recipe.adapter.method!r}; "
                f"remove the key or change the method"]
    if recipe.train.device == "cpu":
        return [f"model.load_in_8bit: needs a CUDA GPU but train.device = \"cpu\"; {how}"]
    if not cuda_available():
        return [f"model.load_in_8bit: an 8-bit base needs a CUDA GPU and this machine has none; {how}"]
    if importlib.util.find_spec("bitsandbytes") is None:
        return ["model.load_in_8bit: needs the bitsandbytes package: pip install bitsandbytes (or remove the key)"]
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


register_method(Method("lora", is_adapter=True, default_lr=5e-4, wrap=_wrap_lora, validate=_validate_8bit))
register_method(Method("prompt_tuning", is_adapter=True, default_lr=2e-2, wrap=_wrap_prompt_tuning,
                       validate=_validate_8bit, prompt_learning=True))
register_method(Method("prefix_tuning", is_adapter=True, default_lr=1e-2, wrap=_wrap_prefix_tuning,
                       validate=_validate_8bit, prompt_learning=True))
register_method(Method("ia3", is_adapter=True, default_lr=5e-3, wrap=_wrap_ia3, validate=_validate_ia3))
register_method(Method("full", is_adapter=False, default_lr=5e-5, wrap=_wrap_full))
