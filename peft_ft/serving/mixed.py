"""Mixed-adapter forwards in two matmuls per LoRA layer, whatever the number of adapters in the batch.

peft's own per-row path (`lora.Linear._mixed_batch_forward`) runs, in every LoRA layer, one sub-batch per adapter
present: it builds each adapter's row list in Python, gathers those rows (`x[rows]`: a host-to-device copy of the
index on a GPU) and scatters the result back. MiniLM has 37 LoRA layers, so a batch over 4 adapters pays 148
gathers, 148 scatters and as many index copies per forward: per-call work that no GPU hides.

Here each layer keeps its adapters' factors side by side: A_cat (R x in) stacks every adapter's A, B_cat (out x R)
every adapter's B times its scaling, R the sum of their ranks. A row's output is then

    base(x) + B_cat ((A_cat x) * mask)

where the mask keeps, for each row, the R columns of its own adapter (rows of `__base__` or of an adapter this
layer does not have keep none). The extra arithmetic is R instead of r columns: 32 instead of 8 for four rank-8
adapters, small beside the base layer. The row ids reach the device once per forward, not once per layer.

Only plain LoRA layers take this path: LoRA variants (aLoRA...) and LoRA with a bias on B keep peft's. peft itself
refuses per-row adapters in training and with DoRA.
"""

from __future__ import annotations

import threading
import types

_IDS: dict[str, int] = {}  # adapter name -> small integer, the same in every layer (the mask compares these)
_IDS_LOCK = threading.Lock()  # two threads must never give two names one id
_ROWS = threading.local()  # per thread (groups answer in parallel): the forward's adapter_names list, its ids


def install(model) -> int:
    """Give every plain LoRA Linear of `model` the concatenated mixed-batch path; returns how many layers were new
    to it. Call it again after each attach or delete of an adapter: new LoRA layers appear where a new adapter
    targets new modules, and every layer's concatenated factors are dropped (rebuilt at the next forward)."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is not Linear:
            continue
        module._peft_ft_factors = None
        if "_mixed_batch_forward" not in vars(module):
            module._peft_ft_peft_mixed = module._mixed_batch_forward  # peft's own, for what this path does not take
            module._mixed_batch_forward = types.MethodType(_mixed_forward, module)
            count += 1
    return count


def _id(name: str) -> int:
    found = _IDS.get(name)
    if found is None:
        with _IDS_LOCK:
            found = _IDS.setdefault(name, len(_IDS))
    return found


def _mixed_forward(self, x, *args, adapter_names: list[str], **kwargs):
    import torch

    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    variants = getattr(self, "lora_variant", {})
    present = set(adapter_names)
    if (any(name in variants for name in present) or any(kwargs.get(k) is not None for k in VARIANT_KWARG_KEYS)
            or any(self.lora_B[n].bias is not None for n in present if n in self.lora_B)):  # lora_bias: peft's path
        return self._peft_ft_peft_mixed(x, *args, adapter_names=adapter_names, **kwargs)
    for k in VARIANT_KWARG_KEYS:  # peft hands them on even when None; the base layer takes none of them
        kwargs.pop(k, None)
    result = self.base_layer(x, *args, **kwargs)
    factors = _factors(self, x.device)
    if factors is None:
        return result
    a, b, columns = factors
    rows = _row_ids(adapter_names, x.device)
    hidden = torch.nn.functional.linear(x.to(a.dtype), a)  # (batch, ..., R)
    keep = rows.view(-1, *([1] * (hidden.dim() - 1))) == columns  # (batch, 1.., R): each row's own columns
    return result + torch.nn.functional.linear(hidden * keep, b).to(result.dtype)


def _factors(layer, device):
    """(A_cat, B_cat with scaling, column ids) of the layer's adapters; None when the layer has none. `install`
    drops them at each attach or delete; the key also catches adapters changed behind its back (names, tensors)."""
    import torch

    names = [n for n in layer.lora_A if n in layer.lora_B]
    key = tuple((n, layer.lora_A[n].weight.data_ptr(), layer.lora_B[n].weight.data_ptr(), layer.scaling[n]) for n in names)
    cached = getattr(layer, "_peft_ft_factors", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if not names:
        factors = None
    else:
        a = torch.cat([layer.lora_A[n].weight for n in names], dim=0).detach()
        b = torch.cat([layer.lora_B[n].weight * layer.scaling[n] for n in names], dim=1).detach()
        ids = [_id(n) for n in names]
        columns = torch.tensor([i for n, i in zip(names, ids) for _ in range(layer.lora_A[n].weight.shape[0])],
                               device=device)
        factors = (a, b, columns)
    layer._peft_ft_factors = (key, factors)
    return factors


def _row_ids(adapter_names: list[str], device):
    """Each row's adapter id on the device; peft hands every layer of one forward the same list object, so the
    tensor is made once per forward."""
    import torch

    if getattr(_ROWS, "names", None) is not adapter_names or _ROWS.ids.device != device:
        ids = [_id(n) if n != "__base__" else -1 for n in adapter_names]
        _ROWS.names, _ROWS.ids = adapter_names, torch.tensor(ids, device=device)
    return _ROWS.ids
