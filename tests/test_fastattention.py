"""Training attention with fast dropout computes what SDPA's maths computes, and only while training."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import fit
from peft_ft.kernels import fastattention, install
from peft_ft.kernels.fastattention import AttentionFunction
from peft_ft.kernels.masks import keep_mask


def reference(q, k, v, bias, scale, keep, p):
    scores = q @ k.transpose(-1, -2) * scale + bias
    return (torch.softmax(scores, -1) * keep / (1 - p)) @ v


@pytest.mark.parametrize("lq,lk", [(5, 5), (3, 7)])  # self-attention and cross-attention shapes
def test_equals_the_reference_with_the_same_mask(lq, lk):
    torch.manual_seed(0)
    b, h, d, p, scale = 2, 3, 4, 0.3, 0.5
    # strided views, as a model hands them over ([B, L, H, D] projections transposed)
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64).transpose(1, 2).requires_grad_() for n in (lq, lk, lk))
    bias = torch.zeros(b, 1, lq, lk, dtype=torch.float64)
    bias[0, :, :, -2:] = torch.finfo(torch.float64).min  # the first row's last two keys are padding
    torch.manual_seed(5)
    out = AttentionFunction.apply(q, k, v, bias, scale, p)
    torch.manual_seed(5)
    keep = keep_mask((b * h, lq, lk), p, "cpu").view(b, h, lq, lk).to(torch.float64)
    assert 0 < keep.mean() < 1
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    want = reference(q, k, v, bias, scale, keep, p)
    torch.testing.assert_close(out, want)
    for got, expected in zip(ours, torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(got, expected)


def tiny_bert(attention_dropout: float):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=attention_dropout, attn_implementation="sdpa")
    return BertForTokenClassification(config)


def count_calls(monkeypatch) -> list:
    calls = []
    original = AttentionFunction.apply

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(AttentionFunction, "apply", spy)
    return calls


def test_used_only_while_training_with_dropout_and_evaluation_is_sdpa_exactly(monkeypatch):
    stock = tiny_bert(0.2)
    fast = copy.deepcopy(stock)
    assert install(fast)["fast_attention_configs"] == 1
    assert fast.config._attn_implementation == fastattention.NAME
    calls = count_calls(monkeypatch)
    ids = torch.randint(1, 50, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    stock.eval(), fast.eval()
    with torch.no_grad():
        assert torch.equal(fast(input_ids=ids, attention_mask=mask).logits, stock(input_ids=ids, attention_mask=mask).logits)
    assert calls == []
    fast.train()
    fast(input_ids=ids, attention_mask=mask, labels=ids % 2).loss.backward()
    assert len(calls) == 2  # one per layer


def test_padding_is_masked_while_training(monkeypatch):
    """A padded row's real tokens do not see the padding: changing the padded ids changes nothing."""
    model = tiny_bert(0.2)
    install(model)
    calls = count_calls(monkeypatch)
    model.train()
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    other = ids.clone()
    other[1, 3:] = torch.randint(1, 50, (4,))
    outputs = []
    for batch in (ids, other):
        torch.manual_seed(11)  # same dropout masks
        outputs.append(model(input_ids=batch, attention_mask=mask).logits)
    assert len(calls) == 4
    torch.testing.assert_close(outputs[0][1, :3], outputs[1][1, :3])
    assert not torch.allclose(outputs[0][1, 3:], outputs[1][1, 3:])


def test_without_attention_dropout_training_uses_sdpa(monkeypatch):
    model = tiny_bert(0.0)
    install(model)
    calls = count_calls(monkeypatch)
    model.train()
    model(input_ids=torch.randint(1, 50, (2, 5)), labels=torch.zeros(2, 5, dtype=torch.long)).loss.backward()
    assert calls == []


def test_a_saved_model_does_not_name_our_attention(tmp_path):
    model = tiny_bert(0.1)
    install(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert fastattention.NAME not in json.dumps(saved)


def test_training_learns():
    model = tiny_bert(0.1)
    install(model)
    torch.manual_seed(3)
    ids = torch.randint(1, 5, (8, 6))
    losses = fit(model, ids, ids % 2, steps=30)
    assert losses[-1] < 0.5 * losses[0]
