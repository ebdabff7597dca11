"""The training engine on accelerate: mixed precision, schedulers, evaluation every N steps, early
stopping, experiment trackers (TensorBoard, MLflow, W&B offline) and where the fused CPU kernels apply."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import recipe_text, reload_difference, sentiment_rows, write_jsonl, write_recipe
from peft_ft.errors import PeftFtError, RecipeError
from peft_ft.recipe.explain import explain
from peft_ft.recipe.load import build_recipe, load_recipe
from peft_ft.recipe.schema import SCHEDULERS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine-data")
    write_jsonl(d / "train.jsonl", sentiment_rows(40, seed=1))
    write_jsonl(d / "valid.jsonl", sentiment_rows(12, seed=2))
    write_jsonl(d / "test.jsonl", sentiment_rows(12, seed=3))
    return d


def recipe_file(tmp: Path, tiny_bert, data, train: dict | None = None) -> Path:
    """2 epochs at lr 1e-2 with validation and test splits; `train`: more [train] keys."""
    return write_recipe(tmp / "e.toml", recipe_text(
        tiny_bert, data, model_opts={"max_length": 32}, data={"validation": "valid.jsonl", "test": ["test.jsonl"]},
        train_opts={"epochs": 2, "lr": 1e-2, **(train or {})}, output={"dir": tmp / "runs", "name": "e"}))


@pytest.fixture(scope="module")
def tracked_bf16_run(tmp_path_factory, tiny_bert, data):
    """One bf16 CPU run, evaluated every 2 steps, reporting to TensorBoard and an MLflow file store."""
    from peft_ft.engine.run import run

    tmp = tmp_path_factory.mktemp("tracked")
    train = {"mixed_precision": "bf16", "eval_every": 2, "report_to": ["tensorboard", "mlflow"], "scheduler": "cosine"}
    return run(load_recipe(recipe_file(tmp, tiny_bert, data, train)))


def test_bf16_on_cpu_trains_and_saves_a_float32_adapter(tracked_bf16_run, tiny_bert):
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(tracked_bf16_run / "adapter_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert any("lora_B" in n and w.abs().max() > 1e-4 for n, w in weights.items())  # B starts at zero: it trained
    log = (tracked_bf16_run / "train.log").read_text()
    assert "precision bf16 (frozen base in bfloat16, trained weights float32)" in log


def test_bf16_run_scores_the_saved_adapter_on_the_float32_base(tracked_bf16_run):
    """The final evaluation runs after the frozen weights are back in float32: reloading the saved adapter
    (float32, as users load it) gives the run's own test predictions."""
    assert reload_difference(tracked_bf16_run) < 1e-5


def test_eval_every_makes_one_history_entry_per_evaluation(tracked_bf16_run):
    metrics = json.loads((tracked_bf16_run / "metrics.json").read_text())
    history = metrics["train"]["history"]
    assert metrics["train"]["steps"] == 10  # 2 epochs x ceil(40 / 8)
    assert [h["steps"] for h in history] == [2, 4, 6, 8, 10]
    assert [h["epoch"] for h in history] == [1, 1, 2, 2, 2]
    assert all("validation_macro_f1" in h for h in history)
    assert metrics["train"]["best_step"] in (2, 4, 6, 8, 10)


def test_tensorboard_event_files_hold_the_expected_tags(tracked_bf16_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tracked_bf16_run / "tracking").rglob("events.out.tfevents.*"))
    assert events, list((tracked_bf16_run / "tracking").rglob("*"))
    scalars, values = {}, {}
    for f in events:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.step for e in acc.Scalars(tag)]
            values[tag] = [e.value for e in acc.Scalars(tag)]
    assert scalars["train/loss"] == list(range(1, 11))  # every optimizer step
    # the rate each step trained at (no warmup step here): the peak first, and the cosine not yet at 0 on the last
    assert values["train/lr"][0] == max(values["train/lr"]) and values["train/lr"][-1] > 0
    assert scalars["train/lr"] == list(range(1, 11))
    assert scalars["train/tokens_per_second"] == list(range(1, 11))
    assert scalars["validation/macro_f1"] == scalars["validation/accuracy"] == [2, 4, 6, 8, 10]
    assert "train/epoch_loss" in scalars and scalars["best/test/macro_f1"] == scalars["best/validation/accuracy"] == [10] and "validation/matthews" in scalars


def test_mlflow_file_store_gets_the_metrics(tracked_bf16_run):
    from mlflow.tracking import MlflowClient

    store = tracked_bf16_run / "tracking" / "mlruns"
    assert store.is_dir()
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert {"train/loss", "train/lr", "validation/macro_f1", "best/test/accuracy"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 11))
    assert run.data.params["train.mixed_precision"] == "bf16"


def test_the_mlflow_file_store_is_this_runs_only(tracked_bf16_run):
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ: left there, the next run in this process
    (a sweep's next trial) took it for the user's own setting and logged into the first run's folder."""
    import os

    import mlflow

    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert str(tracked_bf16_run.resolve()) not in mlflow.get_tracking_uri()


def test_wandb_writes_an_offline_run_inside_the_run_folder(tmp_path, tiny_bert, data, monkeypatch):
    """report_to = ["wandb"] with no WANDB_* settings: an offline run under <run>/tracking/wandb (no account, no
    network), its transaction log holding the loop's metrics. wandb 0.31 has no Python reader for that log (its
    Go core reads it); the metric names stand in it as plain strings."""
    from peft_ft.engine.run import run

    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    run_dir = run(load_recipe(recipe_file(tmp_path, tiny_bert, data, {"eval_every": 2, "report_to": ["wandb"]})))
    (log,) = (run_dir / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")
    written = log.read_bytes()
    for key in (b"train/loss", b"train/lr", b"train/tokens_per_second", b"validation/accuracy", b"validation/macro_f1"):
        assert key in written, key


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_name_builds_and_steps(name):
    import torch

    from peft_ft.engine.train import make_scheduler

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = make_scheduler(optimizer, name, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert all(0.0 <= lr <= 1.0 for lr in lrs)
    json.dumps(scheduler.state_dict())  # checkpoints keep it as JSON (no pickles)


def test_scheduler_names_are_transformers_names():
    from transformers import SchedulerType

    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}


@pytest.mark.parametrize("train, message", [
    ({"scheduler": "cosine_with_restarts"}, "train.scheduler: 'cosine_with_restarts' would run as cosine (num_cycles stays 1)"),
    ({"scheduler": "polynomial"}, "train.scheduler: 'polynomial' would run as linear (power stays 1)"),
    ({"scheduler": "constant", "warmup": 0.5}, 'train.warmup: 0.5 with train.scheduler "constant", which has no warmup'),
])
def test_schedule_settings_that_would_change_nothing_are_refused(train, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        build_recipe({"data": {"train": "t.jsonl"}, "train": train}, "r.toml")
    assert build_recipe({"data": {"train": "t.jsonl"}, "train": {"scheduler": "constant"}}, "r.toml")  # default warmup: fine


def test_engine_keys_are_validated_together_and_explained():
    raw = {"data": {"train": "t.jsonl"},
           "train": {"scheduler": "cosine_with_min_lr", "report_to": ["tensorbord"], "mixed_precision": "fp8",
                     "gradient_accumulation_steps": 0, "early_stopping_patience": 2, "pad_to_multiple_of": 0}}
    with pytest.raises(RecipeError) as e:
        build_recipe(raw, "r.toml")
    text = str(e.value)
    for expected in ("train.scheduler: unknown value 'cosine_with_min_lr'", "train.report_to: unknown value 'tensorbord' (did you mean 'tensorboard'?)",
                     "train.mixed_precision: expected one of 'no', 'bf16', 'fp16'", "train.gradient_accumulation_steps: must be at least 1",
                     "train.early_stopping_patience: needs a validation split", "train.pad_to_multiple_of: must be at least 1"):
        assert expected in text, text
    shown = explain("train")
    for key in ("mixed_precision", "gradient_accumulation_steps", "scheduler", "eval_every", "early_stopping_patience", "report_to",
                "pad_to_multiple_of"):
        assert f"  {key} :" in shown


def test_fp16_on_cpu_is_refused_with_the_reason():
    from peft_ft.engine.device import check_engine

    recipe = build_recipe({"data": {"train": "t.jsonl"}, "train": {"mixed_precision": "fp16", "device": "cpu"}}, "r.toml")
    with pytest.raises(PeftFtError, match="fp16.*needs a CUDA GPU.*use \"bf16\""):
        check_engine(recipe)


def scripted_train(values: list[float], patience: int, eval_every: int = 0, epochs: int = 8):
    """`train()` on a tiny model whose validation returns `values` in turn; returns the result and the calls."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from peft_ft.engine.train import train

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32, num_labels=2))
    features = [{"input_ids": [2, 5 + i % 20, 3], "labels": i % 2, "length": 3} for i in range(16)]
    recipe = build_recipe({"data": {"train": "t.jsonl", "validation": "v.jsonl"},
                           "train": {"epochs": epochs, "batch_size": 8, "threads": 1, "device": "cpu", "eval_every": eval_every,
                                     "early_stopping_patience": patience}}, "r.toml")
    calls = []

    def validate(epoch):
        calls.append(epoch)
        return {"accuracy": values[len(calls) - 1]}

    result = train(model, features, recipe, lr=1e-3, pad_id=0, device="cpu", validate=validate, metric="accuracy")
    return result, calls


def test_pad_to_multiple_of_rounds_every_field_up_to_the_cap():
    from peft_ft.data.batching import pad_batch, padded_width

    assert [padded_width(w, 8) for w in (1, 8, 9, 17)] == [8, 8, 16, 24]
    assert padded_width(380, 64, max_width=384) == 384  # 448 would pass model.max_length
    assert padded_width(400, 64, max_width=384) == 400  # a field already past the cap (seq2seq targets) is left as it is
    rows = [{"input_ids": [2, 7, 9, 3], "labels": [-100, 1, 2, -100], "length": 4},
            {"input_ids": [2, 5, 3], "labels": [-100, 4, -100], "length": 3}]
    batch = pad_batch(rows, pad_id=0, multiple=8)
    assert batch["input_ids"].tolist() == [[2, 7, 9, 3, 0, 0, 0, 0], [2, 5, 3, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist()[1] == [-100, 4, -100] + [-100] * 5
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 3 + [0] * 5]
    assert pad_batch(rows, pad_id=0, multiple=8, max_width=6)["input_ids"].shape == (2, 6)


def padded_run(multiple: int, features: list[dict], model_class, num_labels: int):
    """Three optimizer steps of `train()` on a tiny BERT without dropout: its weights before and after, and the steps."""
    import torch
    from transformers import BertConfig

    from peft_ft.engine.train import TrainHooks, train

    torch.manual_seed(0)
    model = model_class(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, num_labels=num_labels, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0))
    recipe = build_recipe({"data": {"train": "t.jsonl"},
                           "train": {"epochs": 1, "max_steps": 3, "batch_size": 4, "threads": 1, "device": "cpu",
                                     "warmup": 0.0, "pad_to_multiple_of": multiple}}, "r.toml")
    steps, untrained = [], {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, features, recipe, lr=1e-2, pad_id=0, device="cpu", validate=None, metric="f1",
          hooks=TrainHooks(after_step=lambda model, step: steps.append(step)))
    return untrained, {n: p.detach().clone() for n, p in model.named_parameters()}, steps


@pytest.mark.parametrize("family", ["token", "sequence"])
def test_extra_padding_trains_the_same_weights(family):
    """train.pad_to_multiple_of adds masked positions only: NER labels there are -100, attention never sees them,
    so the trained weights are those of the unpadded run (to float rounding)."""
    import torch
    from transformers import BertForSequenceClassification, BertForTokenClassification

    lengths = [3, 5, 6, 9, 4, 7, 5, 11, 3, 8, 6, 10]
    if family == "token":
        features = [{"input_ids": [2] + [5 + (i * 3 + j) % 30 for j in range(n - 2)] + [3],
                     "labels": [-100] + [(i + j) % 3 for j in range(n - 2)] + [-100], "length": n} for i, n in enumerate(lengths)]
        model_class, labels = BertForTokenClassification, 3
    else:
        features = [{"input_ids": [2] + [5 + (i * 7 + j) % 30 for j in range(n - 2)] + [3], "labels": i % 2, "length": n}
                    for i, n in enumerate(lengths)]
        model_class, labels = BertForSequenceClassification, 2
    untrained, plain, steps = padded_run(1, features, model_class, labels)
    _, padded, padded_steps = padded_run(16, features, model_class, labels)
    assert steps == padded_steps == [1, 2, 3]
    assert not torch.equal(plain["classifier.weight"], untrained["classifier.weight"])  # it trained
    for name, value in plain.items():
        torch.testing.assert_close(padded[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_early_stopping_stops_at_the_right_evaluation():
    # best at the 2nd evaluation; the 3rd and 4th are not better: patience 2 stops after the 4th
    result, calls = scripted_train([0.5, 0.7, 0.6, 0.7, 0.9, 0.9, 0.9, 0.9], patience=2)
    assert len(calls) == 4 and result.stopped_early
    assert (result.best_epoch, result.best_step, result.best_value) == (2, 4, 0.7)
    assert result.steps == 8 and result.epochs_run == 4
    assert [h["validation_accuracy"] for h in result.history] == [0.5, 0.7, 0.6, 0.7]


def test_early_stopping_counts_evaluations_not_epochs_and_resets_on_improvement():
    # every step (2 per epoch): better at the 3rd, then 2 worse: stop after the 5th, mid-training
    result, calls = scripted_train([0.1, 0.2, 0.3, 0.3, 0.25, 0.9], patience=2, eval_every=1)
    assert len(calls) == 5 and result.stopped_early and result.steps == 5 and result.best_step == 3
    assert result.epochs_run == 3  # stopped in the third epoch


def test_without_patience_every_evaluation_runs():
    result, calls = scripted_train([0.5] * 8, patience=0)
    assert len(calls) == 8 and not result.stopped_early and result.best_epoch == 1


def test_cuda_runs_keep_cudnn_attention_out(tiny_bert, data, tmp_path, monkeypatch):
    """On CUDA, setup_torch takes cuDNN out of torch's attention backends (it builds a plan per batch shape, and ours
    change at every step); on the CPU it leaves the setting alone."""
    import torch

    from peft_ft.engine import device

    monkeypatch.setattr(device, "check_engine", lambda recipe: None)  # no GPU here: skip "torch sees no CUDA GPU"
    recipe = load_recipe(recipe_file(tmp_path, tiny_bert, data))
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert device.setup_torch(recipe).type == "cpu" and torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setattr(device, "use_cuda", lambda recipe: True)
        assert device.setup_torch(recipe).type == "cuda"
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)


def test_fast_kernels_are_for_cpu_only(tiny_bert, data, tmp_path):
    """On CUDA (or any device but the CPU) the stock peft layers run; the fused ones only on CPU."""
    import torch
    from peft.tuners.lora import Linear as PeftLoraLinear

    from peft_ft.engine.run import build_model, use_fast_kernels
    from peft_ft.kernels.fastlora import FastDropout
    from peft_ft.methods import METHODS
    from peft_ft.tasks import TASKS

    recipe = load_recipe(recipe_file(tmp_path, tiny_bert, data))
    assert recipe.train.fast_kernels
    assert use_fast_kernels(recipe, torch.device("cpu"))
    assert not use_fast_kernels(recipe, torch.device("cuda", 0)) and not use_fast_kernels(recipe, "cuda")
    task, method = TASKS[recipe.task.type], METHODS[recipe.adapter.method]
    loaded = task.load(recipe, data)
    stock, _, _ = build_model(recipe, task, method, str(tiny_bert), loaded, torch.device("meta"))  # not the CPU
    fused, _, _ = build_model(recipe, task, method, str(tiny_bert), loaded, torch.device("cpu"))
    assert not getattr(stock, "peft_ft_fast_kernels", False)
    lora = [m for m in stock.modules() if isinstance(m, PeftLoraLinear)]
    assert lora and not any("forward" in vars(m) for m in lora)  # peft's own forward
    assert not any(type(m) is FastDropout for m in stock.modules())
    assert fused.peft_ft_fast_kernels
    assert all("forward" in vars(m) for m in fused.modules() if isinstance(m, PeftLoraLinear))  # the fused one


@pytest.mark.parametrize("adapter, task, fused", [
    ({}, {}, True),  # LoRA on CPU: a bf16 frozen base (peft_ft.engine.precision) with the fused kernels
    ({"method": "full"}, {}, False),  # autocast: the fused autograd functions are not autocast-aware
    ({"use_dora": True}, {}, False),
    ({}, {"type": "seq2seq"}, False),
])
def test_where_bf16_runs_the_fused_kernels(adapter, task, fused):
    from peft_ft.engine.run import use_fast_kernels

    recipe = build_recipe({"data": {"train": "t.jsonl"}, "adapter": adapter, "task": task,
                           "train": {"mixed_precision": "bf16"}}, "r.toml")
    assert recipe.train.fast_kernels and use_fast_kernels(recipe, "cpu") is fused


@pytest.mark.parametrize("native", [True, False])
def test_bf16_build_casts_the_frozen_base_and_warns_where_bf16_is_emulated(tiny_bert, data, tmp_path, monkeypatch, caplog, native):
    import logging

    import torch

    from peft_ft.engine import run as runner
    from peft_ft.methods import METHODS
    from peft_ft.tasks import TASKS

    monkeypatch.setattr(runner, "native_bf16_cpu", lambda: native)
    recipe = load_recipe(recipe_file(tmp_path, tiny_bert, data, {"mixed_precision": "bf16"}))
    task, method = TASKS[recipe.task.type], METHODS[recipe.adapter.method]
    with caplog.at_level(logging.INFO, logger="peft_ft"):
        model, _, _ = runner.build_model(recipe, task, method, str(tiny_bert), task.load(recipe, data), torch.device("cpu"))
    assert model.peft_ft_fast_kernels and model.peft_ft_frozen_bf16
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert "frozen base in bfloat16" in caplog.text
    assert ("no native bf16" in caplog.text) is not native


@pytest.mark.parametrize("fast", [False, True])
def test_glibc_allocator_setting_only_with_fast_kernels(monkeypatch, fast):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from peft_ft.engine import train as loop

    calls = []  # the loop's own names for peft_ft.kernels.allocator's two settings
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(loop, "release_freed_memory", lambda: calls.append("release"))
    model = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32, num_labels=2))
    if fast:
        model.peft_ft_fast_kernels = True  # what peft_ft.engine.run.build_model marks when it installs them
    recipe = build_recipe({"data": {"train": "t.jsonl"}, "train": {"epochs": 1, "batch_size": 4, "threads": 1, "device": "cpu"}}, "r.toml")
    features = [{"input_ids": [2, 5 + i, 3], "labels": i % 2, "length": 3} for i in range(4)]
    loop.train(model, features, recipe, lr=1e-3, pad_id=0, device=torch.device("cpu"), validate=None, metric="accuracy")
    assert calls == (["keep", "release"] if fast else [])


def test_resume_from_a_mid_epoch_evaluation_checkpoint_matches(tmp_path):
    """With train.eval_every, a checkpoint follows each evaluation (mid-epoch too); continuing from one ends
    exactly where the uninterrupted run ends: weights, history, best evaluation, patience."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from peft_ft.engine import checkpoint
    from peft_ft.engine.train import train

    recipe = build_recipe({"data": {"train": "t.jsonl", "validation": "v.jsonl"},
                           "train": {"epochs": 2, "batch_size": 4, "threads": 1, "device": "cpu", "eval_every": 3,
                                     "keep_checkpoints": 100, "early_stopping_patience": 5, "scheduler": "cosine"}}, "r.toml")
    features = [{"input_ids": [2, 5 + i % 20, 6 + i % 7, 3], "labels": i % 2, "length": 4} for i in range(20)]
    scores = iter([0.1, 0.3, 0.2, 0.25] * 2)

    def run(run_dir, resume_from=None):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32, num_labels=2))
        result = train(model, features, recipe, lr=1e-2, pad_id=0, device="cpu", metric="accuracy",
                       validate=lambda epoch: {"accuracy": next(scores)}, run_dir=run_dir, resume_from=resume_from)
        return model, result

    (tmp_path / "a").mkdir()
    straight_model, straight = run(tmp_path / "a")
    assert [h["steps"] for h in straight.history] == [3, 6, 9, 10] and straight.best_step == 6
    saved = [p.name for p in checkpoint.listed(tmp_path / "a")]
    assert saved == ["step-0000003", "step-0000005", "step-0000006", "step-0000009", "step-0000010"]  # 5: epoch 1's end
    scores = iter([0.2, 0.25])  # what validation answers after step 6, as in the straight run
    resumed_model, resumed = run(tmp_path / "a", resume_from=tmp_path / "a" / "checkpoints" / "step-0000006")
    assert resumed.history == straight.history and resumed.best_step == straight.best_step == 6
    for (n, a), (_, b) in zip(straight_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), n


def test_hooks_see_every_step_and_evaluation():
    from transformers import BertConfig, BertForSequenceClassification

    from peft_ft.engine.train import TrainHooks, train

    model = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32, num_labels=2))
    seen = {"steps": [], "grads": [], "evaluations": []}

    def after_step(m, step):
        seen["steps"].append(step)
        seen["grads"].append(any(p.grad is not None for p in m.parameters()))  # before the gradients are cleared

    hooks = TrainHooks(after_step=after_step, on_evaluation=seen["evaluations"].append)
    recipe = build_recipe({"data": {"train": "t.jsonl", "validation": "v.jsonl"},
                           "train": {"epochs": 2, "batch_size": 4, "threads": 1, "device": "cpu", "scheduler": "constant",
                                     "weight_decay": 0.0}}, "r.toml")
    features = [{"input_ids": [2, 5 + i, 3], "labels": i % 2, "length": 3} for i in range(8)]
    train(model, features, recipe, lr=1e-2, pad_id=0, device="cpu", validate=lambda e: {"accuracy": 0.5},
          metric="accuracy", hooks=hooks)
    assert seen["steps"] == [1, 2, 3, 4] and all(seen["grads"])
    assert [(e["epoch"], e["steps"]) for e in seen["evaluations"]] == [(1, 2), (2, 4)]


def test_a_launcher_that_started_one_cpu_process_of_several_says_so(monkeypatch):
    """`accelerate launch --num_processes 2 --cpu` leaves the processes to mpirun and starts one: it trained alone,
    exit 0, without a word."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from peft_ft.engine.accelerator import notes

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    one = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert "started one" in notes(one)[0] and "cpu_ddp.yaml" in notes(one)[0]
    monkeypatch.delenv("MASTER_ADDR")  # `--num_processes 1 --cpu`: one asked, one started
    assert notes(one) == []


def test_a_resumed_run_goes_on_in_its_own_tracker_run(tmp_path, tiny_bert, data):
    """--resume after a kill reopens the MLflow run the killed process started (one run per training, FINISHED, its
    loss curve to the last step), rather than a second run beside one left RUNNING forever. Each draws each step
    once: the steps the killed process logged after its checkpoint are purged (TensorBoard) or not logged again
    (MLflow, which cannot delete them), not drawn twice."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers import run_killed
    from peft_ft.cli import main

    recipe = recipe_file(tmp_path, tiny_bert, data, {"report_to": ["mlflow", "tensorboard"], "checkpoint_every": 2,
                                                     "batch_size": 8})
    assert run_killed(recipe, after=2, cwd=tmp_path).returncode != 0  # in step 4, after its checkpoint at step 2
    (run_dir,) = (tmp_path / "runs" / "e").iterdir()
    tensorboard = next((run_dir / "tracking" / "tensorboard").iterdir())
    killed = EventAccumulator(str(tensorboard)).Reload()
    assert max(e.step for e in killed.Scalars("train/loss")) > 2  # logged past its checkpoint at step 2
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert [e.step for e in EventAccumulator(str(tensorboard)).Reload().Scalars("train/loss")] == list(range(1, 11))
    client = MlflowClient(tracking_uri=(run_dir / "tracking" / "mlruns").resolve().as_uri())
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.status for r in runs] == ["FINISHED"]
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert steps == list(range(1, 11))  # 2 epochs x 5 steps, before and after the kill, each once
    assert runs[0].data.params["train.epochs"] == "2"  # logged once, at the start


def test_a_reopened_mlflow_run_skips_only_the_points_it_already_holds(monkeypatch):
    """Skipping every value at or below the highest step logged lost a killed process's last evaluation: it logged
    step 8's loss, died evaluating step 8, and the resume's validation numbers at 8 (and its best/ scores) were dropped."""
    from accelerate.tracking import MLflowTracker

    from peft_ft.engine.accelerator import _reopened_mlflow

    logged = []
    monkeypatch.setattr(MLflowTracker, "log", lambda self, values, step=None, **kwargs: logged.append((values, step)))
    tracker = object.__new__(_reopened_mlflow())
    tracker.logged_until = {"train/loss": 8, "validation/f1": 4}
    tracker.log({"train/loss": 0.5, "validation/f1": 0.7}, step=8)
    tracker.log({"train/loss": 0.4}, step=7)
    tracker.log({"train/loss": 0.3, "best/test/f1": 0.6}, step=9)
    assert logged == [({"validation/f1": 0.7}, 8), ({"train/loss": 0.3, "best/test/f1": 0.6}, 9)]


def test_trackers_that_cannot_start_are_refused_before_the_run_folder(tmp_path, monkeypatch):
    """An MLflow server that is down took MLflow four minutes of retries, then a traceback and a half-made run folder;
    wandb online without a key and a user's own MLflow file store (refused by MLflow 3) were tracebacks too."""
    import socket

    from peft_ft.engine.accelerator import _local_store, _tracker_failure, check_tracking
    from peft_ft.errors import PeftFtError

    recipe = build_recipe({"data": {"train": "t.jsonl"}, "train": {"report_to": ["mlflow", "wandb"]}}, "r.toml")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(PeftFtError, match=rf"r.toml: train.report_to: the MLflow server at MLFLOW_TRACKING_URI=http://127.0.0.1:{port} does not answer"):
        check_tracking(recipe)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(PeftFtError, match=r"WANDB_MODE=online, but no wandb API key"):
        check_tracking(recipe)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_tracking(recipe)
    assert _local_store("./mlruns") and _local_store("file:///tmp/m") and not _local_store("http://host:5000") and not _local_store(None)
    assert _tracker_failure(RuntimeError("boom"), recipe).startswith("r.toml: train.report_to: a tracker (mlflow, wandb) could not start (boom)")


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_while_the_model_loads_ends_the_run_through_its_handlers_and_leaves_no_folder(tmp_path, tiny_bert, data,
                                                                                            signal_name, code):
    """SIGTERM outside the training loop killed the process at once (tracker runs RUNNING for good, nothing logged);
    Ctrl-C there left a folder with only recipe.toml and train.log, which --resume could never go on from."""
    import subprocess
    import sys

    recipe = recipe_file(tmp_path, tiny_bert, data, {"report_to": ["mlflow"]})
    # SIGINT's Python handler, as in a terminal: a process started under pytest-xdist inherits SIGINT ignored
    script = ("import os, signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "import peft_ft.engine.run as run\nfrom peft_ft.cli import main\n"
              "def loading(*args, **kwargs):\n"
              f"    os.kill(os.getpid(), signal.{signal_name})\n    time.sleep(30)\n"
              "run.build_model = loading\nsys.exit(main(['run', sys.argv[1]]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(recipe)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == code, done.stderr[-2000:]
    assert "interrupted: no checkpoint had been written yet; start the run again" in done.stdout + done.stderr
    assert not (tmp_path / "runs" / "e").exists()  # the folder, and the recipe's folder it alone was in, are gone


def test_settings_the_runs_step_count_leaves_idle_are_named_at_the_start(tmp_path, tiny_bert, data):
    """Patience of 5 over 2 epoch-end evaluations could never stop the run: it trained to the end without a word."""
    from peft_ft.engine.run import run

    run_dir = run(load_recipe(recipe_file(tmp_path, tiny_bert, data, {"early_stopping_patience": 5})))
    log = (run_dir / "train.log").read_text()
    assert "train.early_stopping_patience 5 cannot stop this run: it evaluates 2 time(s) in 10 steps" in log


def test_a_max_steps_past_the_epochs_and_a_batch_past_the_data_are_named():
    """train.max_steps above epochs x steps did not extend the run, and nothing said so; a data set smaller than the
    effective batch was reported as batches of the full size."""
    from types import SimpleNamespace

    from peft_ft.engine.train import _idle_settings

    t = SimpleNamespace(max_steps=50, epochs=2, batch_size=16, gradient_accumulation_steps=2, early_stopping_patience=0,
                        eval_every=0)
    found = _idle_settings(t, total=2, per_epoch=1, validated=True, rows=20)
    assert found == ["train.max_steps 50 only caps the run: train.epochs 2 x 1 steps make 2, where it ends; raise "
                     "train.epochs to train longer",
                     "the training data has 20 rows, fewer than the effective batch of 32: each step takes all 20"]
    assert _idle_settings(SimpleNamespace(**{**vars(t), "max_steps": 2}), total=2, per_epoch=1, validated=True, rows=32) == []


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_plain_cpu_run_does_not_import_deepspeed(tmp_path, tiny_bert, data, method):
    """accelerate's unwrap_model imports DeepSpeed whenever it is installed (the [test] extra), which printed
    "[WARNING] ... Setting accelerator to CPU. If you have GPU ..." into every one-process run's output; a full
    fine-tuning's save reached it through transformers' save_pretrained."""
    import subprocess
    import sys

    recipe = recipe_file(tmp_path, tiny_bert, data, {"epochs": 1})
    recipe.write_text(recipe.read_text() + f'\n[adapter]\nmethod = "{method}"\n')  # recipe_file writes no [adapter]
    code = ("import sys; from peft_ft.cli import main; code = main(['run', sys.argv[1]]); "
            "print('deepspeed imported:', 'deepspeed' in sys.modules); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "deepspeed imported: False" in done.stdout and "Setting accelerator" not in done.stdout + done.stderr


def test_weights_left_infinite_by_training_are_never_saved():
    """weight_decay = 1e308 (now refused: max 10) trained to exit 0 and saved 75 of 76 tensors non-finite; the
    loss, checked before each step, never saw it."""
    import torch

    from peft_ft.engine.run import check_finite_weights
    from peft_ft.errors import PeftFtError

    recipe = build_recipe({"data": {"train": "t.jsonl"}, "train": {"weight_decay": 0.5}}, "r.toml")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    check_finite_weights(model, recipe)
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    with pytest.raises(PeftFtError, match=r"r\.toml: training left 1 trained weight tensor\(s\) with NaN or infinity \(1\.weight"):
        check_finite_weights(model, recipe)
    model[1].weight.requires_grad_(False)  # frozen weights are the base's, not this training's
    check_finite_weights(model, recipe)
    with pytest.raises(Exception, match="train.weight_decay"):
        build_recipe({"data": {"train": "t.jsonl"}, "train": {"weight_decay": 1e308}}, "r.toml")


def test_the_learning_rate_a_run_used_is_in_its_metrics(tmp_path, tiny_bert, data):
    """recipe.toml keeps train.lr = 0 ("the method's default"): the rate the run trained at was written nowhere."""
    import json

    from peft_ft.engine.run import run
    from peft_ft.methods import METHODS

    run_dir = run(load_recipe(recipe_file(tmp_path, tiny_bert, data, {"epochs": 1}), ["train.lr=0"]))
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["lr"] == METHODS["lora"].default_lr
