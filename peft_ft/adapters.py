"""Adapter methods, registered by name: how each wraps a loaded model and what it checks in a recipe.

Light at import (no torch); peft is imported when a method actually wraps a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from peft_ft.schema import Recipe

# Which linear layers LoRA adapts, by `config.model_type`. Every linear layer of the encoder by
# default (attention and feed-forward): on small models this keeps quality close to full
# fine-tuning at ~1.5 % trainable parameters. T5 follows the LoRA paper (attention q and v).
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


@dataclass(frozen=True)
class Method:
    name: str
    is_adapter: bool  # False: every weight trains and the whole model is saved
    default_lr: float
    wrap: Callable  # (model, recipe, heads: list[str], peft_task_type: str | None) -> model
    validate: Callable[[Recipe], list[str]] = lambda recipe: []


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"adapter method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def linear_layer_names(model) -> list[str]:
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def lora_targets(model, recipe: Recipe) -> list[str]:
    from peft_ft.errors import PeftFtError

    if recipe.adapter.target_modules:
        return recipe.adapter.target_modules
    model_type = model.config.model_type
    if model_type not in LORA_TARGETS:
        raise PeftFtError(
            f"{recipe.source}: adapter.target_modules: no default for model type {model_type!r}; "
            f"set it to some of this model's linear layers: {', '.join(linear_layer_names(model))}"
        )
    return LORA_TARGETS[model_type]


def _wrap_lora(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    from peft import LoraConfig, get_peft_model

    a = recipe.adapter
    config = LoraConfig(
        task_type=peft_task_type,
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=lora_targets(model, recipe),
        bias=a.bias,
        use_rslora=a.use_rslora,
        modules_to_save=list(heads),  # (a copy: peft appends to it) the task head trains and is saved inside the adapter file
    )
    return get_peft_model(model, config)


def _wrap_full(model, recipe: Recipe, heads: list[str], peft_task_type: str | None):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _validate_8bit(recipe: Recipe) -> list[str]:
    """8-bit needs CUDA here; checked without importing torch when the answer is already known."""
    if not recipe.model.load_in_8bit:
        return []
    if recipe.train.device == "cpu":
        return ["model.load_in_8bit: needs a CUDA GPU but train.device = \"cpu\"; remove the key to train in float32"]
    return []


register_method(Method("lora", is_adapter=True, default_lr=5e-4, wrap=_wrap_lora, validate=_validate_8bit))
register_method(Method("full", is_adapter=False, default_lr=5e-5, wrap=_wrap_full))
