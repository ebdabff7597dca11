"""bf16 LoRA training on CPU: the frozen base stored in bfloat16, the trained weights kept in float32.

Why not accelerate's autocast, which `train.mixed_precision = "bf16"` means everywhere else: on a CPU
with AMX (Intel Xeon, 2 threads) a bf16 matmul of MiniLM's shapes ran at ~2,500 GFLOP/s against ~230 in
float32, yet a LoRA training step under autocast was only ~1.3x faster than float32. Autocast copies
every frozen weight to bf16 at every forward (`copy_` was 16 % of the step), and the fused CPU kernels
(peft_ft.kernels) were off under it, so peft's dropout draws (`bernoulli_`, 23 %) came back. Storing the
frozen weights in bf16 once removes the copies and lets the fused kernels run, with the activations in
bf16 (bench/RESULTS.md has the step times).

What stays float32: every trained weight (LoRA's A and B, the task head), its gradient and AdamW's
state, so the saved adapter is float32 as in any run. A pre-hook casts the inputs of the modules that
own trained weights (the head) to float32, so the logits and the loss are float32 too. When training
ends the frozen weights get their original float32 values back (kept aside, not re-widened from bf16),
so the final evaluation scores what a user who loads the saved adapter on the float32 base gets.

Where this does not apply (full fine-tuning, other methods, LoRA with trained biases or DoRA, seq2seq
models whose loss comes from a frozen LM head, CUDA) bf16 stays accelerate's autocast.
"""

from __future__ import annotations

from peft_ft.engine.device import use_cuda
from peft_ft.engine.distributed import deepspeed_in_one_process
from peft_ft.recipe.schema import Recipe
from peft_ft.tasks import TASKS

# LoRA's own factor modules: peft's layer casts their input to their dtype, and the fused kernels cast A and B.
_LORA_FACTORS = {"lora_A", "lora_B"}
# Loss computed inside the model from a frozen head's logits: they would be bf16.
_LOSS_IN_FROZEN_HEAD = {"SEQ_2_SEQ_LM"}


def frozen_bf16(recipe: Recipe) -> bool:
    """Whether this run trains with a bf16 frozen base (else bf16, if asked for, is autocast)."""
    a = recipe.adapter
    return (
        recipe.train.mixed_precision == "bf16"
        and not use_cuda(recipe)
        and not deepspeed_in_one_process()  # ZeRO-3 partitions the frozen weights: DeepSpeed's own bf16 runs instead
        and a.method == "lora"
        and a.bias == "none"  # a trained bias would sit in a bf16 layer
        and not a.use_dora  # DoRA's magnitude is computed from the frozen weight inside peft's layer
        and a.init != "eva"  # EVA's SVD of the first batches' activations runs in the loop: not in bf16 on CPU
        and TASKS[recipe.task.type].peft_task_type not in _LOSS_IN_FROZEN_HEAD
    )


class FrozenBf16:
    """Casts a wrapped model's frozen floating-point weights to bf16 and back.

    `store()` before training, `restore()` after it; the float32 originals are kept aside in between,
    so weights and outputs after `restore()` are exactly those of a float32 run's model."""

    @classmethod
    def attach(cls, model) -> dict:
        """Store `model`'s frozen weights in bf16; `detach(model)` restores them. Returns what was cast."""
        holder = cls(model)
        model.peft_ft_frozen_bf16 = holder  # a plain attribute (not a module): not in the state dict
        return holder.store()

    @staticmethod
    def detach(model) -> None:
        """Back to float32 frozen weights if `attach` cast them; nothing otherwise."""
        holder = getattr(model, "peft_ft_frozen_bf16", None)
        if holder is not None:
            holder.restore()
            del model.peft_ft_frozen_bf16

    def __init__(self, model):
        self.model = model
        self.originals: dict[str, object] = {}
        self.hooks: list = []

    def store(self) -> dict:
        import torch

        for name, param in self.model.named_parameters():
            if param.requires_grad:
                param.data = param.data.float()  # trained weights, gradients and optimizer state: float32
            elif param.is_floating_point() and param.dtype != torch.bfloat16:
                self.originals[name] = param.data
                param.data = param.data.to(torch.bfloat16)
        for name, module in self.model.named_modules():
            own = list(module.parameters(recurse=False))
            if own and all(p.requires_grad for p in own) and not _LORA_FACTORS.intersection(name.split(".")):
                self.hooks.append(module.register_forward_pre_hook(_inputs_to_float32))  # the head
        return {"bf16_frozen_tensors": len(self.originals), "float32_input_hooks": len(self.hooks)}

    def restore(self) -> None:
        params = dict(self.model.named_parameters())
        for name, original in self.originals.items():
            params[name].data = original
        for hook in self.hooks:
            hook.remove()
        self.originals, self.hooks = {}, []


def _inputs_to_float32(module, args):
    import torch

    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def precision_label(model, accelerator) -> str:
    """For the run log: what precision the loop runs in."""
    if getattr(model, "peft_ft_frozen_bf16", None) is not None:
        return "bf16 (frozen base in bfloat16, trained weights float32)"
    if accelerator.mixed_precision == "no":
        return "float32"
    if accelerator.distributed_type.value == "DEEPSPEED":
        return f"{accelerator.mixed_precision} (DeepSpeed: 16-bit weights, float32 master copies in its optimizer)"
    return f"{accelerator.mixed_precision} autocast"


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16); elsewhere oneDNN emulates it."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
