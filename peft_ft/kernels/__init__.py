"""CPU fast paths: fused LoRA layers and integer-generator dropout (fastlora), a leaner attention dropout
(fastattention), both drawing masks from `masks`; the allocator setting that keeps freed memory (allocator).
Optional: a run works without them (train.fast_kernels = false). `install` is the one entry a run calls."""

from __future__ import annotations


def install(model) -> dict:
    """Patch a (peft-wrapped or plain) model in place for training on CPU; returns what was changed. Parameter
    names and state dicts stay as they are, so the saved adapter is peft's own."""
    # Imported here, not at the top: they import torch and peft, and `peft_ft.kernels.allocator` (the server's)
    # must stay light to import.
    from peft_ft.kernels import fastattention, fastlora

    return {**fastlora.speed_up(model), "fast_attention_configs": fastattention.install(model)}
