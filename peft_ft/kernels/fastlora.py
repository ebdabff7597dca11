"""Faster, leaner LoRA training on CPU, with the same maths and the same saved adapter.

Measured on the 2-core CPU (MiniLM-L6, LoRA r=8 on query/key/value/dense, batch 32 x ~24 tokens),
peft's LoRA layer spends more time in elementwise work than in its matmuls:
- `nn.Dropout` on CPU draws floats through bernoulli: ~20 ms for a 768x384 input, as long as a
  768x384x384 matmul. Each LoRA layer drops its own copy of the input (q, k and v drop the same
  input three times) and keeps it for backward.
- `result + lora_B(lora_A(x)) * scaling` makes two more full-size passes over the output.

`LoraLinearFunction` does the same computation in one autograd node: the dropout mask is drawn
as integers (fast), once per input tensor, and shared with its dropped copy by every layer that
reads that input; backward keeps the dropped input and a 1-byte mask, not the input itself; the
LoRA term is added inside the matmul (`addmm_`), and the rank-r products are laid out so the
CPU GEMM runs them fast (below). The base weight stays frozen, so backward computes no weight
gradient for it. Parameters, names and the saved adapter are peft's own: only `forward` of each
eligible LoRA layer is replaced, and only while training.

`FastDropout` replaces the model's own `nn.Dropout` modules the same way (same distribution, an
integer generator instead of bernoulli, a 1-byte mask kept for backward instead of 4 bytes).
"""

from __future__ import annotations

import weakref

import torch

from peft_ft.kernels.masks import apply_mask, keep_mask


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scale * (kept A^T) B^T with W, b frozen; gradients for x, A and B.

    `kept` is x with LoRA dropout's dropped entries zeroed (x itself when p = 0) and `keep` the
    uint8 mask (None when p = 0), made once per input tensor by `_SharedDropout` so layers reading
    the same input share them. Dropout's 1 / (1 - p) is folded into `scale` by the caller: a
    multiply of the r x N products instead of a pass over every N x d input.

    The rank-r products are computed as r x N (`zt = A kept^T`), not N x r: an N x 8 output
    makes the CPU GEMM run 3-5x slower than the same FLOPs with N as the long output side
    (measured per shape on this CPU; see bench/README.md, "LoRA kernels").
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, kept, keep):
        flat = x.reshape(-1, x.shape[-1])
        kept = kept.reshape(flat.shape)
        ctx.factor_dtype = lora_a.dtype
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # a bf16 base trains float32 factors (engine.precision)
        out = torch.nn.functional.linear(flat, weight, bias)
        zt = lora_a @ kept.t()  # r x N
        out.addmm_(zt.t(), lora_b.t(), alpha=scale)
        ctx.save_for_backward(weight, lora_a, lora_b, zt, kept, keep)
        ctx.scale, ctx.x_shape = scale, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        weight, lora_a, lora_b, zt, kept, keep = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gzt = (lora_b.t() @ g.t()).mul_(ctx.scale)  # r x N: scale * (g B)^T
        grad_a = gzt @ kept
        grad_b = (zt @ g).mul_(ctx.scale).t()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gzt.t() @ lora_a
            if keep is not None:  # the LoRA branch saw only the kept entries of x
                grad_x.mul_(keep.reshape(grad_x.shape).to(grad_x.dtype))
            grad_x = grad_x.addmm_(g, weight).view(ctx.x_shape)  # + the frozen layer's g W, in the GEMM
        return grad_x, None, None, grad_a.to(ctx.factor_dtype), grad_b.to(ctx.factor_dtype), None, None, None


class _DropoutFunction(torch.autograd.Function):
    """Inverted dropout that keeps its mask for backward as uint8, not as a float tensor."""

    @staticmethod
    def forward(ctx, x, keep, p: float):
        ctx.save_for_backward(keep)
        ctx.p = p
        return apply_mask(x, keep, p)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return apply_mask(grad, keep, ctx.p), None, None


class _SharedDropout:
    """One dropout mask per distinct input tensor: q, k and v read the same hidden states, so they
    share one draw, one dropped copy and one saved mask (peft keeps three of each)."""

    def __init__(self):
        self.last = None  # weak reference to the last input: a new tensor never matches a dead one
        self.out = (None, None)

    def __call__(self, x, p: float):
        if p == 0:
            return x, None
        if self.last is None or self.last() is not x:
            with torch.no_grad():
                keep = keep_mask(x.shape, p, x.device)
                self.out = (x * keep.to(x.dtype), keep)  # 1 / (1 - p) goes into the LoRA scale
            self.last = weakref.ref(x)
        return self.out


def _fast_path_ok(layer, x) -> bool:
    base = layer.base_layer
    return (
        layer.training
        and not layer.disable_adapters
        and not layer.merged
        and len(layer.active_adapters) == 1
        and layer.active_adapters[0] in layer.lora_A
        and layer.active_adapters[0] not in layer.lora_variant  # DoRA and friends keep peft's path
        and type(base) is torch.nn.Linear
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and x.dtype == base.weight.dtype
    )


def _dropout_p(layer) -> float:
    return getattr(layer.lora_dropout[layer.active_adapters[0]], "p", 0.0)  # nn.Identity when peft's dropout is 0


def _make_forward(layer, original, shared: _SharedDropout, group: "_Siblings | None" = None):
    def forward(x, *args, **kwargs):
        if group is not None and not args and not kwargs:
            taken = group.take(layer, x)
            if taken is not None:
                return taken
        if args or kwargs or not _fast_path_ok(layer, x):
            return original(x, *args, **kwargs)
        if group is not None and group.ready(x):
            return group.output(layer, x, shared)
        name = layer.active_adapters[0]
        p = _dropout_p(layer)
        base = layer.base_layer
        kept, keep = shared(x, p)
        return LoraLinearFunction.apply(
            x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
            float(layer.scaling[name]) / (1.0 - p), kept, keep,
        )

    return forward


class SiblingLoraFunction(torch.autograd.Function):
    """`LoraLinearFunction` for n layers reading the same input (q, k and v), in one node.

    What n separate nodes do n times is done once: the rank-r products of the kept input are one
    (n r) x N matmul, the A gradients one matmul, the LoRA part of the input gradient one matmul
    and one mask pass, and the frozen layers' input gradients are accumulated into it by their
    GEMMs (no sums of n input gradients afterwards). All layers share `scale` (same alpha / r, same p).
    Inputs after `n`: the n weights, n biases, n A and n B matrices.
    """

    @staticmethod
    def forward(ctx, x, kept, keep, scale: float, n: int, *params):
        weights, biases, a_list, b_list = (params[i * n : (i + 1) * n] for i in range(4))
        flat = x.reshape(-1, x.shape[-1])
        ctx.factor_dtype = a_list[0].dtype
        lora_a = torch.cat(a_list).to(x.dtype)  # (n r) x d_in; a bf16 base trains float32 factors (engine.precision)
        b_list = [b.to(x.dtype) for b in b_list]
        zt = lora_a @ kept.reshape(flat.shape).t()  # (n r) x N
        ranks = [a.shape[0] for a in a_list]
        outs = []
        for w, b, lora_b, z in zip(weights, biases, b_list, zt.split(ranks)):
            out = torch.nn.functional.linear(flat, w, b)
            out.addmm_(z.t(), lora_b.t(), alpha=scale)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
        ctx.save_for_backward(lora_a, zt, kept, keep, *weights, *b_list)
        ctx.scale, ctx.n, ctx.ranks, ctx.x_shape = scale, n, ranks, x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        lora_a, zt, kept, keep, *rest = ctx.saved_tensors
        n, ranks, scale = ctx.n, ctx.ranks, ctx.scale
        weights, b_list = rest[:n], rest[n:]
        gs = [g.reshape(-1, g.shape[-1]) for g in grads]
        gzt = torch.empty_like(zt)  # (n r) x N: scale * (g_i B_i)^T stacked
        for rows, lora_b, g in zip(gzt.split(ranks), b_list, gs):
            torch.mm(lora_b.t(), g.t(), out=rows)
        gzt.mul_(scale)
        grad_a = (gzt @ kept.reshape(-1, kept.shape[-1])).to(ctx.factor_dtype).split(ranks)
        grad_b = [(z @ g).mul_(scale).t().to(ctx.factor_dtype) for z, g in zip(zt.split(ranks), gs)]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gzt.t() @ lora_a
            if keep is not None:
                grad_x.mul_(keep.reshape(grad_x.shape).to(grad_x.dtype))
            for g, w in zip(gs, weights):
                grad_x.addmm_(g, w)
            grad_x = grad_x.view(ctx.x_shape)
        return (grad_x, None, None, None, None, *[None] * (2 * n), *grad_a, *grad_b)


# Names of the projections that read one input, per architecture family (BERT/RoBERTa, DistilBERT,
# BART/most decoders, T5). Only these are fused: other LoRA layers of one parent may read different inputs.
SIBLING_NAMES = [("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v")]


class _Siblings:
    """Sibling LoRA layers computed together by whichever is called first; the others take their
    output if they are called with the same input tensor. A sibling called with another input while
    its output waits (cross-attention: queries from the decoder, keys and values from the encoder)
    turns the grouping off for good, and every layer computes alone from then on."""

    def __init__(self, layers: list):
        self.layers, self.enabled = layers, True
        self.source, self.pending = None, {}

    def take(self, layer, x):
        """This layer's output if a sibling computed it from the same input, else None."""
        out = self.pending.pop(id(layer), None)
        if out is not None and self.source() is not x:  # this sibling reads another input
            self.enabled, self.pending = False, {}
            return None
        return out

    def ready(self, x) -> bool:
        return self.enabled and all(_fast_path_ok(layer, x) for layer in self.layers) and len(self._settings()) == 1

    def _settings(self) -> set:
        return {(float(layer.scaling[layer.active_adapters[0]]), _dropout_p(layer)) for layer in self.layers}

    def output(self, layer, x, shared: _SharedDropout):
        """Compute every sibling from `x`; the others' outputs wait for them (replacing any left
        over from a forward pass that stopped half-way)."""
        (scaling, p), = self._settings()
        kept, keep = shared(x, p)
        names = [m.active_adapters[0] for m in self.layers]
        params = ([m.base_layer.weight for m in self.layers] + [m.base_layer.bias for m in self.layers]
                  + [m.lora_A[k].weight for m, k in zip(self.layers, names)]
                  + [m.lora_B[k].weight for m, k in zip(self.layers, names)])
        outs = SiblingLoraFunction.apply(x, kept, keep, scaling / (1.0 - p), len(self.layers), *params)
        self.source = weakref.ref(x)
        self.pending = {id(m): out for m, out in zip(self.layers, outs) if m is not layer}
        return outs[self.layers.index(layer)]


def _sibling_groups(model, lora_class) -> list[list]:
    groups = []
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SIBLING_NAMES:
            layers = [children.get(name) for name in names]
            if all(type(layer) is lora_class for layer in layers):
                groups.append(layers)
    return groups


class FastDropout(torch.nn.Module):
    """`nn.Dropout` with masks from an integer generator (several times faster on CPU)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return _DropoutFunction.apply(x, keep_mask(x.shape, self.p, x.device), self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def speed_up(model) -> dict:
    """Patch a (peft-wrapped or plain) model in place for training; returns what was changed.

    LoRA layers get the fused forward; every plain `nn.Dropout` becomes a `FastDropout` with the
    same p. All keep parameter names and state dicts unchanged. (`peft_ft.kernels.install` adds the attention.)
    """
    from peft.tuners.lora.layer import Linear as LoraLinear  # peft's LoRA layer module imports peft's tuners (seconds)

    shared, lora_layers, dropouts, lora_dropouts = _SharedDropout(), 0, 0, set()
    groups = _sibling_groups(model, LoraLinear)
    group_of = {id(layer): group for group in map(_Siblings, groups) for layer in group.layers}
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = _make_forward(module, module.forward, shared, group_of.get(id(module)))
            lora_layers += 1
            lora_dropouts.update(id(d) for d in module.lora_dropout.values())  # the fused path reads their p
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is torch.nn.Dropout and child.p > 0 and id(child) not in lora_dropouts:
                setattr(parent, name, FastDropout(child.p))
                dropouts += 1
    return {"fused_lora_layers": lora_layers, "sibling_groups": len(groups), "fast_dropouts": dropouts}
