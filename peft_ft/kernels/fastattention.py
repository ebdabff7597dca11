"""Attention with dropout for CPU training: the same maths as SDPA, without its dropout's costs.

While training with attention dropout, `scaled_dot_product_attention` takes its math path on CPU,
and measured on the 2-core CPU (MiniLM's 12 heads x 32, batch 32) that path costs, per layer:
- `bernoulli_` for the dropout mask of the B x H x L x L probabilities: ~20 ms at L = 77, more
  than the attention's matmuls;
- two float copies of the probabilities kept for backward (softmax output and its dropped copy),
  plus a mask.
`attention` below draws the mask with the integer generator of `peft_ft.kernels.masks` and keeps the
softmax output and a 1-byte mask: the dropped copy is recomputed in backward. Forward and backward
of one layer's attention: 50.8 -> 30.9 ms at 32 x 77 tokens, 6.5 -> 5.4 ms at 32 x 22 (2 threads).

It is registered with transformers' attention interface under `NAME` and used by models that
asked for "sdpa"; anything else (evaluation, no dropout, a GPU, causal or cached attention,
grouped heads, extra arguments such as a position bias) goes to transformers' own SDPA function
unchanged, with the same mask SDPA would get.
"""

from __future__ import annotations

import weakref

import torch

from peft_ft.kernels.masks import keep_mask

NAME = "peft_ft_sdpa"

# Arguments our path does not implement: their presence sends the call to SDPA.
_UNSUPPORTED = ("position_bias", "softcap", "sliding_window", "cache", "s_aux", "head_mask")


class AttentionFunction(torch.autograd.Function):
    """softmax(q k^T * scale + bias) with inverted dropout, times v; q, k, v as [B, H, L, D].

    Dropout's 1 / (1 - p) is folded into the copy of v made for the matmul, so the dropped
    probabilities are `probs * keep` (two passes, recomputed in backward instead of kept).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, p: float):
        b, h, lq, d = q.shape
        lk = k.shape[2]
        q3 = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
        torch.mul(q, scale, out=q3)  # the copy bmm needs anyway, with the scale folded in
        k3 = k.reshape(b * h, lk, d)
        v3 = torch.empty((b, h, lk, v.shape[-1]), dtype=v.dtype, device=v.device)
        torch.mul(v, 1.0 / (1.0 - p), out=v3)
        q3, v3 = q3.view(b * h, lq, d), v3.view(b * h, lk, -1)
        scores = torch.bmm(q3, k3.transpose(1, 2))
        if bias is not None:
            scores.view(b, h, lq, lk).add_(bias)
        probs = torch.softmax(scores, dim=-1)
        del scores
        keep = keep_mask(probs.shape, p, probs.device)
        out = torch.bmm(probs * keep.to(probs.dtype), v3)
        ctx.save_for_backward(q3, k3, v3, probs, keep)
        ctx.scale, ctx.p, ctx.shapes = scale, p, (q.shape, k.shape, v.shape)
        return out.view(b, h, lq, -1)

    @staticmethod
    def backward(ctx, grad):
        q3, k3, v3, probs, keep = ctx.saved_tensors
        q_shape, k_shape, v_shape = ctx.shapes
        g = grad.reshape(v3.shape[0], q_shape[2], -1)
        keep = keep.to(probs.dtype)
        grad_v = torch.bmm((probs * keep).transpose(1, 2), g).mul_(1.0 / (1.0 - ctx.p))
        grad_probs = torch.bmm(g, v3.transpose(1, 2)).mul_(keep)  # v3 carries 1 / (1 - p)
        del keep
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        del grad_probs
        grad_q = torch.bmm(grad_scores, k3).mul_(ctx.scale)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q3)  # q3 carries the scale
        return grad_q.view(q_shape), grad_k.view(k_shape), grad_v.view(v_shape), None, None, None


class _AdditiveMask:
    """The boolean mask SDPA gets (True = attend) as an additive float bias, made once per mask
    tensor: every layer of a forward pass receives the same mask object."""

    def __init__(self):
        self.last, self.bias = None, None

    def __call__(self, mask, dtype):
        if mask is None or mask.dtype != torch.bool:
            return mask  # None, or already additive
        if self.last is None or self.last() is not mask or self.bias.dtype != dtype:
            self.bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                mask.logical_not(), torch.finfo(dtype).min)
            self.last = weakref.ref(mask)
        return self.bias


_additive = _AdditiveMask()


def _ours(module, query, key, dropout: float, kwargs: dict) -> bool:
    return (
        module.training
        and dropout > 0
        and torch.is_grad_enabled()
        and query.device.type == "cpu"
        and query.dim() == 4
        and key.shape[1] == query.shape[1]  # no grouped key/value heads
        and not getattr(module, "is_causal", False)
        and not kwargs.get("output_attentions")
        and not any(kwargs.get(name) is not None for name in _UNSUPPORTED)
    )


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    """transformers' attention-function signature; returns ([B, L, H, D] output, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _ours(module, query, key, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = AttentionFunction.apply(query, key, value, _additive(attention_mask, query.dtype), scale, dropout)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `NAME` known to transformers, with SDPA's masks (boolean, or None when nothing is padded)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if NAME not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        ALL_ATTENTION_FUNCTIONS.register(NAME, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def install(model) -> int:
    """Switch every config of `model` that uses SDPA to `NAME`; returns how many were switched.
    The config attribute is private to a loaded model: `save_pretrained` does not write it."""
    register()
    switched = 0
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = NAME
            switched += 1
    return switched
