"""`peft-ft run`, top to bottom: recipe -> model + adapter -> data -> train -> evaluate -> save.

Everything that can fail on bad input (model name, data directory, files, columns, labels) is
checked before the run folder is made and before any training starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from peft_ft import __version__
from peft_ft.adapters import METHODS
from peft_ft.data import resolve_data_dir
from peft_ft.log import setup_logging
from peft_ft.models import EMBEDDED_NAME, embedded_model_dir, load_model, load_tokenizer, quiet_transformers, resolve_model, settle_hub_mode
from peft_ft.output import create_run_dir, folder_size, human_size, model_card, save_pretrained_atomic, write_atomic, write_json
from peft_ft.schema import Recipe, load_recipe, to_toml
from peft_ft.tasks import TASKS, Task, TaskData

log = logging.getLogger("peft_ft")
INFO_FILE = "peft_ft.json"


def run(recipe: Recipe, data_dir: str | None = None) -> Path:
    """Train and evaluate one recipe; returns the run folder."""
    task, method = TASKS[recipe.task.type], METHODS[recipe.adapter.method]
    settle_hub_mode(recipe)
    location = resolve_model(recipe)
    data = task.load(recipe, None if recipe.data.hub else resolve_data_dir(recipe, data_dir))
    run_dir = create_run_dir(recipe)
    write_atomic(run_dir / "recipe.toml", to_toml(recipe))
    setup_logging(run_dir)
    try:
        log.info("run folder %s", run_dir)
        for note in data.notes:
            log.info(note)
        log.info("splits: %s", ", ".join(f"{n} {len(s.examples)}" for n, s in data.splits.items()))
        _train_evaluate_save(recipe, task, method, location, data, run_dir)
    finally:
        setup_logging(None)  # detach train.log so later log lines of this process do not land in it
    return run_dir


def build_model(recipe: Recipe, task: Task, method, location: str, data: TaskData, device):
    """Tokenizer, and the model with its head, wrapped by the adapter method."""
    tokenizer = load_tokenizer(location, recipe)
    model, heads = load_model(location, recipe, task.auto_class, **task.model_kwargs(data))
    model = method.wrap(model, recipe, heads, task.peft_task_type).to(device)
    if recipe.train.fast_kernels:
        from peft_ft.fastlora import speed_up

        log.info("fast kernels: %s", ", ".join(f"{k} {v}" for k, v in speed_up(model).items()))
    return model, tokenizer, heads


def _train_evaluate_save(recipe: Recipe, task: Task, method, location: str, data: TaskData, run_dir: Path) -> None:
    from peft_ft.train import setup_torch, train

    device = setup_torch(recipe)
    model, tokenizer, heads = build_model(recipe, task, method, location, data, device)
    trainable, total = count_parameters(model)
    log.info("base %s (%s), method %s: %s trainable of %s parameters (%.3f %%), head: %s",
             recipe.model.name or EMBEDDED_NAME, model.config.model_type, method.name, f"{trainable:,}", f"{total:,}",
             100 * trainable / total, ", ".join(heads) or "none")

    features = {name: task.encode(split, tokenizer, recipe, data) for name, split in data.splits.items()}
    metric = recipe.eval.metric or task.default_metric
    pad_id = tokenizer.pad_token_id or 0

    def evaluate(name: str) -> tuple[dict, list[dict]]:
        outputs = task.predict(model, features[name], pad_id, recipe.eval.batch_size, device)
        return task.score(data.splits[name], features[name], outputs, data)

    result = train(
        model, features["train"], recipe, lr=recipe.train.lr or method.default_lr, pad_id=pad_id, device=device,
        validate=(lambda epoch: evaluate("validation")[0][metric]) if "validation" in data.splits else None, metric=metric,
    )
    metrics = {}
    for name in data.eval_names:
        metrics[name], records = evaluate(name)
        if recipe.eval.predictions:
            task.write_predictions(run_dir, data.splits[name], records)
        log.info("%s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in metrics[name].items() if isinstance(v, float)))

    weight_files = save_model(model, tokenizer, method.is_adapter, run_dir)
    info = {
        "peft_ft_version": __version__,
        "run_dir": str(run_dir),
        "run_name": recipe.output.name or Path(recipe.source).stem,
        "task": task.name,
        "method": method.name,
        "is_adapter": method.is_adapter,
        "base_model": recipe.model.name or EMBEDDED_NAME,
        "model_type": model.config.model_type,
        "auto_class": task.auto_class,
        "labels": data.labels,
        "heads": heads,
        "data": {n: s.source for n, s in data.splits.items()},
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "weight_files": [p.name for p in weight_files],
        "weight_bytes": folder_size(weight_files),
        "train": result.summary(),
    }
    params = {k: info[k] for k in ("trainable_params", "total_params", "trainable_percent", "weight_bytes")}
    write_json(run_dir / INFO_FILE, info)
    write_json(run_dir / "metrics.json", {**metrics, "train": info["train"], "params": params})
    write_atomic(run_dir / "README.md", model_card(recipe, info, metrics))
    log.info("saved %s (%s) in %s", ", ".join(info["weight_files"]), human_size(info["weight_bytes"]), run_dir)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_model(model, tokenizer, is_adapter: bool, run_dir: Path) -> list[Path]:
    """Adapter methods: the adapter and its head only. Full: a complete model folder with tokenizer."""
    files = save_pretrained_atomic(model, run_dir)
    if not is_adapter:
        tokenizer.save_pretrained(run_dir)
    return [f for f in files if f.suffix == ".safetensors"]


def base_location(info: dict) -> str:
    """Where the base model of a saved run is on this machine (the embedded model moves with its venv)."""
    return str(embedded_model_dir()) if info["base_model"] == EMBEDDED_NAME else info["base_model"]


def load_run(run_dir: str | Path, device: str = "cpu"):
    """Rebuild a trained model from a run folder: returns (model, tokenizer, info) in eval mode."""
    import torch
    import transformers

    run_dir = Path(run_dir)
    info = json.loads((run_dir / INFO_FILE).read_text(encoding="utf-8"))
    recipe = load_recipe(run_dir / "recipe.toml")
    task: Task = TASKS[info["task"]]
    kwargs = task.model_kwargs(TaskData(splits={}, labels=info["labels"]))
    quiet_transformers()
    cls = getattr(transformers, info["auto_class"])
    if info["is_adapter"]:
        from peft import PeftModel

        base = cls.from_pretrained(base_location(info), dtype=torch.float32, **kwargs)
        model = PeftModel.from_pretrained(base, run_dir)
        tokenizer = load_tokenizer(base_location(info), recipe)
    else:
        model = cls.from_pretrained(run_dir, dtype=torch.float32)
        tokenizer = load_tokenizer(str(run_dir), recipe)
    return model.to(device).eval(), tokenizer, info
