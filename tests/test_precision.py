"""bf16 LoRA training on CPU (peft_ft.engine.precision): a bf16 frozen base, float32 trained weights,
the fused kernels on bf16 activations, and the float32 weights given back exactly after training."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def lora_model(dropout: float, seed: int = 0):
    """Tiny BERT classifier with LoRA on every linear layer, the head trained (as a run builds it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        num_labels=3, attn_implementation="sdpa",
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # deterministic forwards
    model = BertForSequenceClassification(config)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["query", "key", "value", "dense"],
                      modules_to_save=["classifier"], task_type="SEQ_CLS")
    model = get_peft_model(model, lora)
    with torch.no_grad():  # B starts at zero: give the LoRA branch something to say
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (4, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def trained_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_store_keeps_trained_weights_float32_and_restore_gives_back_every_bit():
    from peft_ft.engine.precision import FrozenBf16

    model = lora_model(0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cast = FrozenBf16.attach(model)
    assert cast["bf16_frozen_tensors"] > 0 and cast["float32_input_hooks"] == 1  # the head (LoRA casts its own)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    model.train()
    out = model(**batch())
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32  # the head runs in float32
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    FrozenBf16.detach(model)
    assert not hasattr(model, "peft_ft_frozen_bf16")
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param.detach(), before[name]), name
    model.eval()
    with torch.no_grad():  # no hook left: the restored model is the float32 model
        reference = lora_model(0.0).eval()
        assert torch.equal(model(**batch()).logits, reference(**batch()).logits)


def loss_and_grads(model, seed: int = 3):
    model.train()
    torch.manual_seed(seed)  # LoRA dropout's masks (peft_ft.kernels.masks) come from torch's generator
    loss = model(**batch()).loss
    loss.backward()
    return loss.item(), trained_grads(model)


def assert_close(reference: dict, grads: dict) -> None:
    """bf16 rounding: each gradient against the largest one (a gradient near zero keeps no relative
    precision in bf16), and all of them by angle."""
    assert reference.keys() == grads.keys() and all(g.dtype == torch.float32 for g in grads.values())
    largest = max(g.abs().max().item() for g in reference.values())
    for name in reference:
        assert (reference[name] - grads[name]).abs().max().item() <= 0.02 * largest, name
    flat = [torch.cat([g[n].flatten() for n in reference]) for g in (reference, grads)]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0).item() > 0.9995


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_kernels_on_a_bf16_base_match_float32(dropout):
    """The fused kernels on a bf16 base give the float32 fused kernels' loss and gradients to bf16
    rounding, LoRA dropout included (same seed, same masks); without dropout peft's own layers on the
    bf16 base agree too."""
    from peft_ft.engine.precision import FrozenBf16
    from peft_ft.kernels import install

    reference, fused = lora_model(dropout), lora_model(dropout)
    install(reference)
    FrozenBf16.attach(fused)
    changed = install(fused)
    assert changed["fused_lora_layers"] == 13 and changed["sibling_groups"] == 2  # 2 layers x 6 linears + pooler
    ref_loss, ref_grads = loss_and_grads(reference)
    loss, grads = loss_and_grads(fused)
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert_close(ref_grads, grads)
    if not dropout:
        stock = lora_model(dropout)
        FrozenBf16.attach(stock)
        stock_loss, stock_grads = loss_and_grads(stock)
        assert stock_loss == pytest.approx(ref_loss, rel=1e-2)
        assert_close(ref_grads, stock_grads)


def test_bf16_base_stays_close_to_float32():
    """Same weights, one forward: the bf16 base's loss is the float32 model's to bf16 rounding."""
    from peft_ft.engine.precision import FrozenBf16

    full, half = lora_model(0.0), lora_model(0.0)
    FrozenBf16.attach(half)
    full.eval()
    half.eval()
    with torch.no_grad():
        assert half(**batch()).loss.item() == pytest.approx(full(**batch()).loss.item(), rel=3e-2)
