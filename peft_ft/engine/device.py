"""Where a run trains and in which precision: the device and thread choices, the seeds, and the checks of what this
machine cannot run (made before the run folder exists, and by `validate`). torch loads only when a recipe asks for
CUDA or mixed precision, or when training starts."""

from __future__ import annotations

import importlib.util
import os
import random

from peft_ft.engine import distributed
from peft_ft.errors import PeftFtError
from peft_ft.recipe.schema import Recipe


def use_cuda(recipe: Recipe) -> bool:
    import torch

    return recipe.train.device == "cuda" or (recipe.train.device == "auto" and torch.cuda.is_available())


def check_engine(recipe: Recipe) -> None:
    """Device and precision choices this machine cannot run; called before the run folder is made (and by
    `validate`: torch, seconds to import, only when the recipe asks for CUDA or mixed precision)."""
    t = recipe.train
    for name in t.report_to:
        module = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}[name]
        if importlib.util.find_spec(module) is None:
            raise PeftFtError(f"{recipe.source}: train.report_to: {name!r} is not installed; "
                              f"pip install 'peft-ft[tracking]' (or remove {name!r})")
    if t.device != "cuda" and t.mixed_precision == "no":
        return
    import torch

    if t.device == "cuda" and not torch.cuda.is_available():
        raise PeftFtError(f"{recipe.source}: train.device: \"cuda\" asked for, but torch sees no CUDA GPU; use \"auto\" or \"cpu\"")
    cuda = use_cuda(recipe)
    if t.mixed_precision == "fp16" and not cuda:
        raise PeftFtError(f"{recipe.source}: train.mixed_precision: \"fp16\" needs a CUDA GPU (float16 autocast with loss "
                          f"scaling); this run is on the CPU: use \"bf16\" (CPU autocast) or \"no\"")
    if t.mixed_precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise PeftFtError(f"{recipe.source}: train.mixed_precision: \"bf16\" is not supported by this GPU "
                          f"(compute capability below 8.0); use \"fp16\" or \"no\"")


def setup_torch(recipe: Recipe):
    """Seed everything and pick threads and device; returns the device."""
    import numpy as np
    import torch

    random.seed(recipe.train.seed)
    np.random.seed(recipe.train.seed)
    torch.manual_seed(recipe.train.seed)
    world = distributed.world()  # processes on one machine share its cores
    torch.set_num_threads(recipe.train.threads or max(1, (os.cpu_count() or 1) // world.local_size))
    check_engine(recipe)
    if not use_cuda(recipe):
        return torch.device("cpu")
    keep_cudnn_attention_out()
    return torch.device("cuda", world.local_rank) if world.size > 1 else torch.device("cuda")


def keep_cudnn_attention_out() -> None:
    """Take cuDNN out of torch's scaled-dot-product attention backends, for this process.

    Our batches change length at nearly every step (length-grouped, each padded to its own longest row). For bf16
    and fp16 attention with a padding mask, torch (2.11 on an H200, seen) tries cuDNN first, and cuDNN builds an
    execution plan for every new shape: on one H200, LoRA on CoNLL ran at 4,516 real tok/s in bf16 against 19,034 in
    float32, and full fine-tuning at 9,830 against 32,112 (bench/RESULTS.md, "GPU check"). The flash and
    memory-efficient kernels that run instead need no per-shape plan. float32 attention never went to cuDNN."""
    import torch

    enable = getattr(torch.backends.cuda, "enable_cudnn_sdp", None)  # torch >= 2.3
    if enable is not None:
        enable(False)


def check_device(recipe: Recipe) -> None:
    """Choices this machine cannot run; the runner calls this before making the run folder."""
    check_engine(recipe)
