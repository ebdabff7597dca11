"""The serving path for mixed-adapter batches (peft_ft.serving.mixed): the same outputs as peft's own per-row path,
with adapters of different ranks, targets, scalings and heads, rows of the bare base, and adapters attached later."""

from __future__ import annotations

import pytest
import torch

from peft_ft.serving import mixed

ADAPTERS = {  # name: (rank, alpha, targets) -- different ranks and targets, so layers hold different adapter sets
    "alpha_one": (4, 8, ["query", "value"]),
    "beta": (8, 32, ["query", "key", "value", "attention.output.dense"]),
    "gamma": (2, 2, ["value"]),
}


def build(tiny_bert):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    model = None
    for name, (r, alpha, targets) in ADAPTERS.items():
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, modules_to_save=["classifier"], init_lora_weights=False)
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    for p in model.parameters():  # init_lora_weights=False gives random B; heads differ per adapter too
        p.data += 0.05 * torch.randn_like(p)
    return model.eval()


def outputs(model, names, per_row=True):
    """Logits of a fixed batch, row i with adapter names[i] (per_row=False: peft's ordinary path, the active adapter)."""
    torch.manual_seed(1)
    ids = torch.randint(5, 90, (len(names), 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # a padded row
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **({"adapter_names": names} if per_row else {})).logits


@pytest.mark.parametrize("names", [["alpha_one", "beta", "gamma", "alpha_one", "__base__", "beta"], ["gamma"] * 3, ["__base__", "beta"]])
def test_mixed_path_equals_peft(tiny_bert, names):
    model = build(tiny_bert)
    expected = outputs(model, names)
    assert mixed.install(model) > 0
    torch.testing.assert_close(outputs(model, names), expected, rtol=0, atol=1e-6)
    solo = {n: outputs(model, [n] * len(names)) for n in set(names)}
    for i, name in enumerate(names):  # each row as if its adapter had answered alone
        torch.testing.assert_close(outputs(model, names)[i], solo[name][i], rtol=0, atol=1e-6)


def test_factors_follow_adapters_attached_and_removed(tiny_bert):
    from peft import LoraConfig

    model = build(tiny_bert)
    mixed.install(model)
    names = ["alpha_one", "beta", "gamma"]
    before = outputs(model, names)
    model.add_adapter("delta", LoraConfig(r=3, lora_alpha=6, target_modules=["query", "intermediate.dense"],
                                      modules_to_save=["classifier"], init_lora_weights=False))
    for n, p in model.named_parameters():
        if ".delta." in n:
            p.data += 0.05 * torch.randn_like(p)
    assert mixed.install(model) > 0  # the intermediate.dense layers are new LoRA layers
    after = outputs(model, names + ["delta"])
    torch.testing.assert_close(after[:3], outputs(model, names), rtol=0, atol=1e-6)
    torch.testing.assert_close(after[:3], before, rtol=0, atol=1e-6)
    model.delete_adapter("delta")
    torch.testing.assert_close(outputs(model, names), before, rtol=0, atol=1e-6)


def test_lora_bias_keeps_peft_path(tiny_bert, monkeypatch):
    """An adapter with a bias on B (lora_bias) is not a pure product of factors: its rows go through peft's path."""
    from peft import LoraConfig

    model = build(tiny_bert)
    model.add_adapter("biased", LoraConfig(r=2, target_modules=["value"], lora_bias=True, modules_to_save=["classifier"],
                                           init_lora_weights=False))
    for n, p in model.named_parameters():
        if ".biased." in n:
            p.data += 0.05 * torch.randn_like(p)
    names = ["biased", "beta", "__base__"]
    expected = outputs(model, names)
    mixed.install(model)
    calls = []
    real = mixed._factors
    monkeypatch.setattr(mixed, "_factors", lambda layer, device: calls.append(layer) or real(layer, device))
    torch.testing.assert_close(outputs(model, names), expected, rtol=0, atol=1e-6)
    value_layers = {id(m) for n, m in model.named_modules() if n.endswith("attention.self.value")}
    assert calls and not value_layers & {id(layer) for layer in calls}  # the biased adapter's layers: peft's path


def test_an_adapter_loaded_again_under_its_name_is_not_answered_from_stale_factors(tiny_bert):
    """Delete, then attach other weights under the same name (serve's DELETE then POST /adapters): AdapterSet calls
    `install` after each, and the next mixed forward uses the new weights, whatever addresses the allocator reuses."""
    from peft import LoraConfig

    def attach(model, seed):
        torch.manual_seed(seed)
        model.add_adapter("swap", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                             modules_to_save=["classifier"], init_lora_weights=False))
        for n, p in model.named_parameters():
            if ".swap." in n:
                p.data += 0.1 * torch.randn_like(p)
        mixed.install(model)

    def alone(model, name):
        model.set_adapter(name)
        return outputs(model, [name, name], per_row=False)

    model = build(tiny_bert)
    mixed.install(model)
    attach(model, seed=3)
    first = outputs(model, ["swap", "swap"])
    torch.testing.assert_close(first, alone(model, "swap"), rtol=0, atol=1e-6)
    model.set_adapter("beta")
    model.delete_adapter("swap")
    mixed.install(model)
    attach(model, seed=4)
    second = outputs(model, ["swap", "swap"])
    torch.testing.assert_close(second, alone(model, "swap"), rtol=0, atol=1e-6)
    assert not torch.allclose(first, second)
    # The allocator may hand the new tensors the old addresses; new values in the same tensors are that case, always.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".swap." in n and "lora_B" in n:
                p.mul_(-1.0)
    mixed.install(model)
    third = outputs(model, ["swap", "swap"])
    torch.testing.assert_close(third, alone(model, "swap"), rtol=0, atol=1e-6)
    assert not torch.allclose(second, third)
