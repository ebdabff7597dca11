"""One shared tester over adapter methods x task families (in the manner of peft's PeftCommonTester).

Each combination trains a few steps on a tiny model (BERT for classification, NER and extractive
QA; T5 for seq2seq) through `peft_ft.run.run` and checks: the loss on a fixed batch went down;
only the adapter and the head get gradients and every frozen weight is unchanged bit for bit;
the run folder reloads (`load_run`) to identical predictions; an adapter folder holds small files
with adapter and head weights only; the recorded parameter counts and sizes are right.
Then: what each method refuses, and the virtual-token shifts of prompt tuning.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import peft_ft.train
from conftest import sentiment_rows, write_jsonl, write_recipe
from peft_ft.adapters import METHODS, cuda_available
from peft_ft.errors import PeftFtError, RecipeError
from peft_ft.run import load_run, run
from peft_ft.schema import build_recipe, load_recipe
from peft_ft.tasks import TASKS
from test_ner import toy_sentences, write_conll
from test_qa import official_file, qa_rows
from tiny_t5 import write_tiny_t5

ADAPTERS = ["lora", "prompt_tuning", "prefix_tuning", "ia3"]
FAMILIES = ["classification", "ner", "qa", "seq2seq"]
NV = 4  # virtual tokens in these tests: few, so that the tiny runs stay fast
LR = {"lora": 1e-2, "prompt_tuning": 3e-2, "prefix_tuning": 1e-2, "ia3": 3e-2, "full": 3e-3}
# Names of the parameters each method may train (besides the head copies in modules_to_save).
ADAPTER_PARAMS = {"lora": ("lora_",), "ia3": ("ia3_l",), "prompt_tuning": ("prompt_encoder",), "prefix_tuning": ("prompt_encoder",)}

# [task] and [data] lines per family; seq2seq also caps its generated answers.# How the saved adapter file names them.
SAVED_ADAPTER_KEYS = {"lora": ("lora_",), "ia3": ("ia3_l",), "prompt_tuning": ("prompt_embeddings",), "prefix_tuning": ("prompt_embeddings",)}

TASK_SECTIONS = {
    "classification": ('type = "classification"', 'train = "train.jsonl"\ntest = ["valid.jsonl"]'),
    "ner": ('type = "ner"', 'train = "train.txt"\ntest = ["valid.txt"]'),
    "qa": ('type = "qa"\ndoc_stride = 6', 'train = "train.json"\ntest = ["valid.jsonl"]'),
    "seq2seq": ('type = "seq2seq"\nmax_target_length = 8', 'train = "train.json"\ntest = ["valid.jsonl"]'),
}
EVAL_SECTIONS = {"seq2seq": "[eval]\nmax_new_tokens = 4"}
MAX_LENGTH = {"classification": 24, "ner": 24, "qa": 24, "seq2seq": 48}


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    return write_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="module")
def family_data(tmp_path_factory) -> dict[str, Path]:
    """A small training and validation split for every family."""
    root = tmp_path_factory.mktemp("method-data")
    dirs = {f: root / f for f in FAMILIES}
    for d in dirs.values():
        d.mkdir()
    # 3 positive rows to 1 negative: the sentiment toy takes dozens of steps on the tiny BERT, a skewed
    # prior moves the loss within the few steps run here.
    rows = sentiment_rows(24, seed=1)
    write_jsonl(dirs["classification"] / "train.jsonl", [r for r in rows if r["label"] == "pos"] + [r for r in rows if r["label"] == "neg"][:4])
    write_jsonl(dirs["classification"] / "valid.jsonl", sentiment_rows(6, seed=2))
    write_conll(dirs["ner"] / "train.txt", toy_sentences(16, 1))
    write_conll(dirs["ner"] / "valid.txt", toy_sentences(6, 2))
    for family in ("qa", "seq2seq"):
        official_file(dirs[family] / "train.json", qa_rows(16, seed=1))
        write_jsonl(dirs[family] / "valid.jsonl", qa_rows(5, seed=2))
    return dirs


def method_section(method: str) -> str:
    extra = f"\nnum_virtual_tokens = {NV}" if method in ("prompt_tuning", "prefix_tuning") else ""
    return f'[adapter]\nmethod = "{method}"{extra}'


def recipe_for(tmp_path: Path, model: Path, data: Path, family: str, method: str, overrides=()):
    task, data_lines = TASK_SECTIONS[family]
    text = f"""
[model]
name = "{model}"
max_length = {MAX_LENGTH[family]}
[task]
{task}
[data]
dir = "{data}"
{data_lines}
{method_section(method)}
[train]
epochs = 2
batch_size = 8
warmup = 0.0
lr = {LR[method]}
threads = 1
{EVAL_SECTIONS.get(family, "")}
[output]
dir = "{tmp_path / 'runs'}"
"""
    return load_recipe(write_recipe(tmp_path / f"{family}_{method}.toml", text), list(overrides))


class Probe:
    """Wraps `peft_ft.train.train`: records the model, its weights, which parameters get gradients
    and the loss on one fixed batch, before and after the real training."""

    def __init__(self, monkeypatch):
        self.real = peft_ft.train.train
        monkeypatch.setattr(peft_ft.train, "train", self)

    def batch_loss(self, batch) -> float:
        import torch

        self.model.eval()
        with torch.no_grad():
            return self.model(**batch).loss.item()

    def __call__(self, model, features, recipe, **kwargs):
        from peft_ft.batching import pad_batch

        self.model = model
        batch = pad_batch(features[:8], kwargs["pad_id"])
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.loss_before = self.batch_loss(batch)
        model.train()
        model(**batch).loss.backward()
        self.with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        model.zero_grad(set_to_none=True)
        result = self.real(model, features, recipe, **kwargs)
        self.loss_after = self.batch_loss(batch)
        return result


def same_outputs(a, b) -> bool:
    """Per-row outputs of `Task.predict`: arrays, tuples of arrays, or generated strings."""
    if isinstance(a, str):
        return a == b
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same_outputs(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and np.allclose(a, b, rtol=0, atol=1e-6)


def assert_reload_predicts_the_same(run_dir: Path, model, recipe, data_dir: Path) -> dict:
    """`load_run` of the run folder answers the held-out split exactly as the trained model in memory."""
    task = TASKS[recipe.task.type]
    loaded, tokenizer, info = load_run(run_dir)
    data = task.load(recipe, data_dir)
    features = task.encode(data.splits["valid"], tokenizer, recipe, data)
    pad = tokenizer.pad_token_id or 0
    trained_out = task.predict(model, features, pad, 16, "cpu")
    loaded_out = task.predict(loaded, features, pad, 16, "cpu")
    assert len(trained_out) == len(loaded_out) == len(features)
    assert all(same_outputs(a, b) for a, b in zip(trained_out, loaded_out))
    return info


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", [*ADAPTERS, "full"])
def test_method_trains_saves_and_reloads(method, family, tmp_path, monkeypatch, tiny_bert, tiny_t5, family_data):
    import torch
    from safetensors import safe_open

    model_dir = tiny_t5 if family == "seq2seq" else tiny_bert
    recipe = recipe_for(tmp_path, model_dir, family_data[family], family, method)
    probe = Probe(monkeypatch)
    run_dir = run(recipe)
    model = probe.model

    # the loss moves: down, on a fixed training batch, without dropout
    assert probe.loss_after < probe.loss_before

    # only the adapter and the head train; nothing else changes, bit for bit
    after = dict(model.named_parameters())
    frozen = [n for n, p in after.items() if not p.requires_grad]
    if method == "full":
        assert not frozen
    else:
        allowed = (*ADAPTER_PARAMS[method], "modules_to_save")
        assert trainable_names(model) and all(any(a in n for a in allowed) for n in trainable_names(model))
        assert probe.with_grad <= trainable_names(model)
        assert any(any(a in n for a in ADAPTER_PARAMS[method]) for n in probe.with_grad)  # the adapter itself gets gradients
        assert all(torch.equal(after[n], probe.before[n]) for n in frozen)
    assert any(not torch.equal(after[n], probe.before[n]) for n in trainable_names(model))

    # save -> reload -> identical predictions
    info = assert_reload_predicts_the_same(run_dir, model, recipe, family_data[family])

    # the recorded numbers are the model's
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    params = json.loads((run_dir / "metrics.json").read_text())["params"]
    assert (params["trainable_params"], params["total_params"]) == (trainable, total)
    assert params["trainable_percent"] == pytest.approx(100 * trainable / total)
    assert params["weight_bytes"] == sum((run_dir / f).stat().st_size for f in info["weight_files"])
    assert f"trainable parameters: {trainable:,} of {total:,}" in (run_dir / "README.md").read_text()
    assert f"{trainable:,} trainable of {total:,}" in (run_dir / "train.log").read_text()

    # an adapter folder holds the adapter and the head, never a copy of the model
    if method != "full":
        assert info["weight_files"] == ["adapter_model.safetensors"]
        assert not (run_dir / "model.safetensors").exists() and not (run_dir / "config.json").exists()
        with safe_open(run_dir / "adapter_model.safetensors", "pt") as f:
            keys = list(f.keys())
        adapter_keys = [k for k in keys if any(a in k for a in SAVED_ADAPTER_KEYS[method])]
        head_keys = [k for k in keys if set(k.split(".")) & set(info["heads"])]
        assert adapter_keys and sorted(adapter_keys + head_keys) == sorted(keys)
        assert head_keys or not info["heads"]  # the head is saved with the adapter
        assert (run_dir / "adapter_model.safetensors").stat().st_size < (model_dir / "model.safetensors").stat().st_size


def test_prefix_projection_saves_the_projected_prefix_and_reloads(tmp_path, monkeypatch, tiny_bert, family_data):
    recipe = recipe_for(tmp_path, tiny_bert, family_data["ner"], "ner", "prefix_tuning", ["adapter.prefix_projection=true"])
    probe = Probe(monkeypatch)
    run_dir = run(recipe)
    assert any("prompt_encoder.default.transform" in n for n in trainable_names(probe.model))  # the MLP trains
    assert_reload_predicts_the_same(run_dir, probe.model, recipe, family_data["ner"])


# --- prompt tuning's virtual positions ------------------------------------------------------------


def build(recipe, family, model_dir, data_dir):
    from peft_ft.run import build_model

    task = TASKS[family]
    data = task.load(recipe, data_dir)
    model, tokenizer, _ = build_model(recipe, task, METHODS[recipe.adapter.method], str(model_dir), data, "cpu")
    return task, model, task.encode(data.splits["train"], tokenizer, recipe, data)


def test_prompt_tuning_ner_loss_reads_the_real_positions(tmp_path, tiny_bert, family_data):
    """The loss of the shifted labels equals cross-entropy over the logits of the real tokens
    against the unshifted labels: label k belongs to input token k, not to a virtual one."""
    import torch
    from peft_ft.batching import pad_batch

    recipe = recipe_for(tmp_path, tiny_bert, family_data["ner"], "ner", "prompt_tuning")
    task, model, features = build(recipe, "ner", tiny_bert, family_data["ner"])
    assert all(f["labels"][:NV] == [-100] * NV and len(f["labels"]) == NV + len(f["input_ids"]) for f in features)
    batch = pad_batch(features[:4], 0)
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[1] == NV + batch["input_ids"].shape[1]
    real = out.logits[:, NV:]
    expected = torch.nn.functional.cross_entropy(real.reshape(-1, real.shape[-1]), batch["labels"][:, NV:].reshape(-1))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # predictions drop the virtual positions: one per real token
    rows = task.unpack(out, batch)
    assert [len(ids) for ids, _ in rows] == batch["attention_mask"].sum(1).tolist()


def test_prompt_tuning_qa_positions_are_shifted_and_logits_cut(tmp_path, tiny_bert, family_data):
    import torch
    from peft_ft.batching import pad_batch

    recipe = recipe_for(tmp_path, tiny_bert, family_data["qa"], "qa", "prompt_tuning")
    task, model, features = build(recipe, "qa", tiny_bert, family_data["qa"])
    plain = recipe_for(tmp_path, tiny_bert, family_data["qa"], "qa", "lora")
    unshifted = task.encode(task.load(plain, family_data["qa"]).splits["train"], load_run_tokenizer(tiny_bert), plain, None)
    assert any(f["start_positions"] > 0 for f in unshifted)  # some windows hold the answer
    assert [f["start_positions"] - NV for f in features] == [f["start_positions"] for f in unshifted]
    assert [f["end_positions"] - NV for f in features] == [f["end_positions"] for f in unshifted]
    batch = pad_batch(features[:4], 0)
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.start_logits.shape[1] == NV + batch["input_ids"].shape[1]
    # peft takes the positions as given (no shift of its own): they index the logits with the virtual ones first
    ce = torch.nn.functional.cross_entropy
    loss = (ce(out.start_logits, batch["start_positions"]) + ce(out.end_logits, batch["end_positions"])) / 2
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    # and predictions drop the virtual positions: the logit read at the answer's real token is the trained one
    for i, (starts, ends) in enumerate(task.unpack(out, batch)):
        assert len(starts) == batch["attention_mask"][i].sum()
        assert starts[unshifted[i]["start_positions"]] == out.start_logits[i, features[i]["start_positions"]].item()
        assert ends[unshifted[i]["end_positions"]] == out.end_logits[i, features[i]["end_positions"]].item()


def load_run_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_prompt_tuning_from_text_starts_at_the_texts_embeddings(tmp_path, tiny_bert, family_data):
    recipe = recipe_for(tmp_path, tiny_bert, family_data["classification"], "classification", "prompt_tuning",
                        ['adapter.init_text="good bad"'])
    _, model, _ = build(recipe, "classification", tiny_bert, family_data["classification"])
    # peft tokenizes the text as the model reads it ([CLS] good bad [SEP]), repeated or cut to the virtual tokens
    ids = load_run_tokenizer(tiny_bert)("good bad")["input_ids"]
    prompt = model.prompt_encoder["default"].embedding.weight
    words = model.word_embeddings.weight
    assert all(np.array_equal(prompt[i].detach().numpy(), words[ids[i % len(ids)]].detach().numpy()) for i in range(NV))


# --- refusals -----------------------------------------------------------------------------------


def write_tiny_distilbert(path: Path) -> Path:
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(vocab_size=200, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(path)
    return path


def test_prefix_tuning_on_a_model_without_past_key_values_is_refused_before_training(tmp_path, monkeypatch, tiny_bert, family_data):
    import shutil

    model_dir = write_tiny_distilbert(tmp_path / "distilbert")
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (tiny_bert / f).exists():
            shutil.copy(tiny_bert / f, model_dir / f)
    called = []
    monkeypatch.setattr(peft_ft.train, "train", lambda *a, **k: called.append(1))
    recipe = recipe_for(tmp_path, model_dir, family_data["classification"], "classification", "prefix_tuning")
    with pytest.raises(PeftFtError, match=r"prefix_tuning needs a model whose layers take past keys.*distilbert.*prompt_tuning, lora or ia3"):
        run(recipe)
    assert not called


def test_virtual_tokens_beyond_the_position_table_are_refused(tmp_path, tiny_bert, family_data):
    # the tiny BERT has 512 positions: 500 tokens + 20 virtual ones do not fit
    recipe = recipe_for(tmp_path, tiny_bert, family_data["classification"], "classification", "prompt_tuning",
                        ["model.max_length=500", "adapter.num_virtual_tokens=20"])
    with pytest.raises(PeftFtError, match=r"model.max_length \(500\) \+ adapter.num_virtual_tokens \(20\) exceeds the 512 "
                                          r"positions.*at most 492"):
        build(recipe, "classification", tiny_bert, family_data["classification"])


def test_unknown_target_module_names_the_models_layers(tmp_path, tiny_bert, family_data):
    recipe = recipe_for(tmp_path, tiny_bert, family_data["classification"], "classification", "lora",
                        ['adapter.target_modules=["q_lin"]'])
    with pytest.raises(PeftFtError, match=r"adapter.target_modules: no module named 'q_lin'.*linear layers: .*query"):
        build(recipe, "classification", tiny_bert, family_data["classification"])


def base_recipe(**adapter) -> dict:
    return {"task": {"type": "classification"}, "data": {"train": "t.jsonl"}, "adapter": adapter}


def test_ia3_recipe_targets_come_with_their_feedforward_subset():
    with pytest.raises(RecipeError, match="adapter.feedforward_modules: required with adapter.target_modules"):
        build_recipe(base_recipe(method="ia3", target_modules=["key", "value"]), "r.toml")
    with pytest.raises(RecipeError, match="lin2 not in adapter.target_modules"):
        build_recipe(base_recipe(method="ia3", target_modules=["k_lin"], feedforward_modules=["lin2"]), "r.toml")
    ok = build_recipe(base_recipe(method="ia3", target_modules=["key", "value"], feedforward_modules=[]), "r.toml")
    assert ok.adapter.feedforward_modules == []


def test_8bit_without_cuda_is_a_validation_error(monkeypatch):
    monkeypatch.setattr("peft_ft.adapters.cuda_available", lambda: False)
    raw = {**base_recipe(method="lora"), "model": {"load_in_8bit": True}}
    with pytest.raises(RecipeError, match=r"load_in_8bit: an 8-bit base needs a CUDA GPU and this machine has none; "
                                          r"remove model.load_in_8bit .* or run the recipe on a machine with a CUDA GPU"):
        build_recipe(raw, "r.toml")
    with pytest.raises(RecipeError, match=r"load_in_8bit: needs a CUDA GPU but train.device = \"cpu\""):
        build_recipe({**raw, "train": {"device": "cpu"}}, "r.toml")
    with pytest.raises(RecipeError, match=r"load_in_8bit: for adapter.method lora or ia3, not 'prompt_tuning'"):
        build_recipe({**raw, "adapter": {"method": "prompt_tuning"}}, "r.toml")


def test_8bit_load_keeps_the_head_and_pooler_in_float(monkeypatch, tiny_bert):
    """The arguments an 8-bit load gets (checked without a GPU): the quantizer must skip the head."""
    import torch
    import transformers

    from peft_ft.models import int8_kwargs

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    recipe = build_recipe({"model": {"name": str(tiny_bert)}, **base_recipe(method="lora")}, "r.toml")
    for auto_class, skipped in (("AutoModelForSequenceClassification", ["classifier", "bert.pooler"]),
                                ("AutoModelForQuestionAnswering", ["qa_outputs"])):
        kwargs = int8_kwargs(str(tiny_bert), recipe, getattr(transformers, auto_class), {"num_labels": 2})
        config = kwargs["quantization_config"]
        assert config.load_in_8bit and config.llm_int8_skip_modules == skipped
        assert kwargs["device_map"] == {"": 0}


def has_8bit_gpu() -> bool:
    import importlib.util

    return cuda_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(not has_8bit_gpu(), reason="needs a CUDA GPU and bitsandbytes")
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_8bit_base_trains_the_adapter_and_a_float_head(method, tmp_path, monkeypatch, tiny_bert, family_data):
    import torch

    recipe = recipe_for(tmp_path, tiny_bert, family_data["classification"], "classification", method,
                        ["model.load_in_8bit=true"])
    probe = Probe(monkeypatch)
    run_dir = run(recipe)
    model = probe.model
    assert any(p.dtype == torch.int8 for p in model.parameters())  # the base is quantized...
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n]
    assert head and all(p.dtype == torch.float32 and p.requires_grad for p in head)  # ...the head is not
    assert probe.loss_after < probe.loss_before
    assert (run_dir / "adapter_model.safetensors").is_file()
