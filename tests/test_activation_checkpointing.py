"""Activation checkpointing recomputes layers in backward: same loss and gradients, dropout included."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import recipe_text, sentiment_rows, write_jsonl, write_recipe
from peft_ft.errors import RecipeError
from peft_ft.kernels import install
from peft_ft.models.loading import enable_activation_checkpointing


def tiny_model(method: str):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="sdpa")
    model = BertForTokenClassification(config)  # 2 labels
    if method == "lora":
        model = get_peft_model(model, LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8, lora_dropout=0.3,
                                                 target_modules=["query", "key", "value", "dense"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    return model


def loss_and_grads(model):
    torch.manual_seed(1)
    ids = torch.randint(1, 60, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids % 2).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("fast", [True, False])
def test_checkpointed_training_equals_plain_training(method, fast):
    plain = tiny_model(method)
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    if fast:
        install(plain), install(checkpointed)
    calls = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        attention = next(m for n, m in model.named_modules() if n.endswith("layer.0.attention.self"))
        attention.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    loss_a, grads_a = loss_and_grads(plain)
    loss_b, grads_b = loss_and_grads(checkpointed)
    assert calls == {"plain": 1, "checkpointed": 2}  # the layer ran again in backward
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert not any("word_embeddings" in name for name in grads_b) or method == "full"
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6)


def test_a_recipe_trains_with_it(tmp_path, tiny_bert):
    from peft_ft.engine.run import run
    from peft_ft.recipe.load import load_recipe

    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(32, seed=1))
    recipe = write_recipe(tmp_path / "r.toml", recipe_text(tiny_bert, tmp_path, train_opts={"epochs": 2, "activation_checkpointing": True},
                                                           output={"dir": tmp_path / "runs"}))
    run_dir = run(load_recipe(recipe))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 8


def test_prefix_tuning_with_it_is_refused_at_validation(tmp_path, tiny_bert):
    from peft_ft.recipe.load import load_recipe

    recipe = write_recipe(tmp_path / "r.toml", recipe_text(tiny_bert, adapter={"method": "prefix_tuning"},
                                                           train_opts={"activation_checkpointing": True}, defaults=False))
    with pytest.raises(RecipeError, match="train.activation_checkpointing"):
        load_recipe(recipe)


@pytest.mark.parametrize("method", ["prompt_tuning", "ia3"])
def test_other_adapters_still_get_gradients(method):
    """Checkpointed layers must not drop what an adapter feeds in (prefix tuning does: refused above)."""
    from peft import IA3Config, PromptTuningConfig, get_peft_model

    model = tiny_model("full")
    config = (PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=3) if method == "prompt_tuning" else
              IA3Config(task_type="TOKEN_CLS", target_modules=["key", "value", "output.dense"],
                        feedforward_modules=["output.dense"]))
    model = get_peft_model(model, config)
    enable_activation_checkpointing(model)
    model.train()
    ids = torch.randint(1, 60, (4, 9))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # prompt tuning: 3 more positions
    (logits ** 2).mean().backward()
    adapter = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and ("prompt" in n or "ia3" in n)}
    assert adapter and all(g is not None and g.abs().sum() > 0 for g in adapter.values())
