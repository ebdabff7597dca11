"""The fused LoRA path and fast dropout compute what peft computes, and train."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import fit
from peft_ft.kernels.fastlora import FastDropout, LoraLinearFunction, SiblingLoraFunction, keep_mask, speed_up


def tiny_lora(dropout: float, hidden_dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        hidden_dropout_prob=hidden_dropout, attention_probs_dropout_prob=0.0)
    model = get_peft_model(BertForTokenClassification(config), LoraConfig(
        task_type="TOKEN_CLS", r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["query", "key", "value", "dense"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the LoRA term matter
            torch.nn.init.normal_(p, std=0.5)
    return model


def loss_and_grads(model, seed=1):
    torch.manual_seed(seed)
    ids, labels = torch.randint(0, 100, (3, 7)), torch.randint(0, 2, (3, 7))
    model.train()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_without_dropout_the_fused_path_equals_peft_exactly():
    stock = tiny_lora(0.0)
    fused = copy.deepcopy(stock)
    assert speed_up(fused)["fused_lora_layers"] == 2 * 6  # q, k, v, attention dense, intermediate, output per layer
    loss_a, grads_a = loss_and_grads(stock)
    loss_b, grads_b = loss_and_grads(fused)
    assert loss_a == loss_b
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6)


def test_with_dropout_the_fused_layer_equals_the_reference_with_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(5, 6, 16, requires_grad=True)
    weight, bias = torch.randn(12, 16), torch.randn(12)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(12, 4, requires_grad=True)
    scale, p = 2.0, 0.3
    keep = keep_mask(x.shape, p, "cpu")
    with torch.no_grad():
        kept = x * keep
    out = LoraLinearFunction.apply(x, weight, bias, a, b, scale / (1 - p), kept, keep)
    grad = torch.randn_like(out)
    out.backward(grad)
    fused = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    reference = torch.nn.functional.linear(x, weight, bias) + scale * ((x * keep / (1 - p)) @ a.t()) @ b.t()
    reference.backward(grad)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused, (x.grad, a.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_drops_p_with_independent_lanes(p):
    torch.manual_seed(0)
    keep = keep_mask((401, 501), p, "cpu")  # odd size: the last 64-bit draw is used in part
    assert keep.shape == (401, 501) and keep.dtype == torch.uint8
    assert set(keep.unique().tolist()) <= {0, 1}
    dropped = (keep == 0).flatten().float()
    assert abs(dropped.mean().item() - p) < 0.005
    # the four 16-bit lanes of one draw go to neighbouring elements: they must not correlate
    for shift in (1, 2, 3):
        a, b = dropped[:-shift], dropped[shift:]
        assert abs((a * b).mean().item() - p * p) < 0.005


def test_keep_mask_follows_torch_seed():
    torch.manual_seed(7)
    first = keep_mask((1000,), 0.3, "cpu")
    torch.manual_seed(7)
    assert torch.equal(first, keep_mask((1000,), 0.3, "cpu"))
    assert not torch.equal(first, keep_mask((1000,), 0.3, "cpu"))


def spy_masks(monkeypatch) -> list:
    """(kind, keep-mask) of every fused call, in call order."""
    calls = []
    for cls, kind, position in ((LoraLinearFunction, "single", -1), (SiblingLoraFunction, "siblings", 2)):
        def spy(*args, _original=cls.apply, _kind=kind, _position=position):
            calls.append((_kind, args[_position]))
            return _original(*args)

        monkeypatch.setattr(cls, "apply", spy)
    return calls


def test_q_k_v_run_as_one_node_with_one_mask_and_the_others_draw_their_own(monkeypatch):
    model = tiny_lora(0.5)
    assert speed_up(model)["sibling_groups"] == 2  # q, k, v of each of the 2 layers
    calls = spy_masks(monkeypatch)
    loss_and_grads(model)
    # per layer: q, k, v together; attention dense, intermediate and output alone, each with its own mask
    assert [kind for kind, _ in calls] == ["siblings", "single", "single", "single"] * 2
    assert len({id(keep) for _, keep in calls}) == len(calls)


def test_siblings_together_equal_siblings_apart():
    """Same masks (one per input either way), same loss and gradients."""
    from peft_ft.kernels import fastlora

    together = tiny_lora(0.5, hidden_dropout=0.1)
    apart = copy.deepcopy(together)
    speed_up(together)
    names, fastlora.SIBLING_NAMES = fastlora.SIBLING_NAMES, []
    try:
        assert speed_up(apart)["sibling_groups"] == 0
    finally:
        fastlora.SIBLING_NAMES = names
    loss_a, grads_a = loss_and_grads(together)
    loss_b, grads_b = loss_and_grads(apart)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_a_forward_pass_stopped_half_way_leaves_the_grouping_on(monkeypatch):
    model = tiny_lora(0.5)
    speed_up(model)
    model.train()
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    query(torch.randn(2, 3, 32))  # k and v never take their outputs
    calls = spy_masks(monkeypatch)
    loss_and_grads(model)
    assert [kind for kind, _ in calls] == ["siblings", "single", "single", "single"] * 2


class CrossAttentionLike(torch.nn.Module):
    """q reads one input, k and v another (as in an encoder-decoder's cross-attention)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x, y):
        return (self.q(x) * self.k(y) + self.v(y)).sum()


def test_siblings_reading_different_inputs_are_computed_apart():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    stock = get_peft_model(CrossAttentionLike(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k", "v"]))
    for name, p in stock.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    fused = copy.deepcopy(stock)
    assert speed_up(fused)["sibling_groups"] == 1
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    for step in range(2):  # the first call finds out, the second runs apart from the start
        results = []
        for model in (stock, fused):
            model.train()
            model.zero_grad()
            model(x, y).backward()
            results.append((model(x, y).item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
        for name, grad in results[0][1].items():
            torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-6)


def test_evaluation_is_untouched_and_training_with_dropout_learns():
    stock = tiny_lora(0.1, hidden_dropout=0.1)
    fused = copy.deepcopy(stock)
    changes = speed_up(fused)
    assert changes["fast_dropouts"] > 0
    left = [n for n, m in fused.named_modules() if type(m) is torch.nn.Dropout and m.p > 0 and "lora_dropout" not in n]
    assert left == []
    ids = torch.randint(0, 100, (4, 9))
    stock.eval(), fused.eval()
    with torch.no_grad():
        assert torch.equal(stock(input_ids=ids).logits, fused(input_ids=ids).logits)
    final = {}
    for name, model in (("stock", stock), ("fused", fused)):
        torch.manual_seed(3)
        ids = torch.randint(0, 4, (4, 9))
        labels = ids % 2  # learnable from 4 distinct token embeddings
        losses = fit(model, ids, labels, steps=40)
        final[name] = sum(losses[-5:]) / 5
        assert final[name] < 0.75 * sum(losses[:5]) / 5, (name, losses)
    # Different masks give different trajectories: over 4 seeds the final losses of the two paths
    # overlapped (stock 0.06-0.27, fused 0.15-0.33 here), so only "both learn" is asserted.


def test_fast_dropout_is_identity_in_eval_and_at_zero():
    x = torch.randn(10, 10)
    d = FastDropout(0.2).eval()
    assert d(x) is x
    assert FastDropout(0.0).train()(x) is x


def test_fast_dropout_gradient_is_the_mask_it_applied():
    torch.manual_seed(0)
    x = torch.randn(64, 48, requires_grad=True)
    out = FastDropout(0.25).train()(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad * kept / 0.75)
