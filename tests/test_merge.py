"""`peft-ft merge`: the adapter and its head folded into the base, as a plain transformers folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TEXTS, train_sentiment
from peft_ft.errors import PeftFtError
from peft_ft.serving.merge import merge_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert) -> Path:
    return train_sentiment(tmp_path_factory.mktemp("merge"), tiny_bert, "pos")


def test_merged_folder_is_plain_and_predicts_like_the_adapter(trained, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from peft_ft.rundir.load import load_run

    out = merge_run(trained, tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "labels.json", "model.safetensors", "peft_ft.json", "recipe.toml", "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not list(tmp_path.glob(".merged.merging-*"))  # the staging folder is gone
    adapter, tokenizer, _ = load_run(trained)
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"} and merged.config.label2id == {"neg": 0, "pos": 1}
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected, got = adapter(**enc).logits, merged(**enc).logits
    assert torch.allclose(expected, got, atol=1e-4, rtol=0)
    info = json.loads((out / "peft_ft.json").read_text())
    assert info["is_adapter"] is False and info["merged_from"] == trained.resolve().name  # a name, no path of this machine
    assert "run_dir" not in info
    # paths kept relative to the run folder now lead from the merged folder to the same places
    from peft_ft.rundir.layout import read_info

    assert read_info(out)["base_model"] == read_info(trained)["base_model"]
    assert (out / info["data_dir"]).resolve() == (trained / json.loads((trained / "peft_ft.json").read_text())["data_dir"]).resolve()
    # the run's input length travels (the base's tokenizer says 1e30, "unset"): stock pipelines cut where the run did
    from peft_ft.recipe.load import load_recipe

    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == load_recipe(trained / "recipe.toml").model.max_length


def test_what_a_killed_merge_left_beside_out_is_removed_by_the_next_one(trained, tmp_path):
    """A SIGKILLed merge (or export, or combine) left its hidden staging folder, a model's size, for good; the next
    command for the same --out removes it, but not a staging folder another process is building in (it holds a lock)."""
    from peft_ft.storage import lock_folder

    killed = [tmp_path / ".merged.merging-k1l2", tmp_path / ".merged.exporting-k3l4"]
    busy, other = tmp_path / ".merged.combining-b5s6", tmp_path / ".other.merging-o7t8"
    for folder in (*killed, busy, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    lock = lock_folder(busy)
    try:
        merge_run(trained, tmp_path / "merged")
    finally:
        os.close(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.combining-b5s6", ".other.merging-o7t8", "merged"]


def test_a_staging_folder_that_cannot_be_opened_is_left_and_the_merge_goes_on(trained, tmp_path, monkeypatch):
    """Another user's killed merge (or a folder whose mode changed): opening it to lock it fails. It is not ours to
    remove; the merge must not end on a PermissionError traceback."""
    import peft_ft.serving.merge as merge

    theirs = tmp_path / ".merged.merging-u1v2"
    theirs.mkdir()
    real = merge.lock_folder

    def lock(folder):
        if folder == theirs:
            raise PermissionError(13, "Permission denied", str(folder))
        return real(folder)

    monkeypatch.setattr(merge, "lock_folder", lock)
    merge_run(trained, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.merging-u1v2", "merged"]


def test_merged_folder_loads_without_peft(trained, tmp_path):
    out = merge_run(trained, tmp_path / "merged")
    # peft made unimportable: the folder must not need it
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "print(type(m).__name__, m.config.id2label[0], m.config.id2label[1], len(t('good film')['input_ids']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["BertForSequenceClassification", "neg", "pos", "4"]


def test_never_writes_into_a_non_empty_folder(trained, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PeftFtError, match="already exists and is not an empty folder"):
        merge_run(trained, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (merge_run(trained, empty) / "model.safetensors").is_file()


def test_methods_that_cannot_merge_say_why(trained, tmp_path, tiny_bert):
    from peft import PromptTuningConfig

    full = train_sentiment(tmp_path, tiny_bert, "full", method="full")
    with pytest.raises(PeftFtError, match="method 'full' trained every weight.*already is a plain transformers model"):
        merge_run(full, tmp_path / "out-full")
    merged = merge_run(trained, tmp_path / "merged")
    with pytest.raises(PeftFtError, match="already merged"):
        merge_run(merged, tmp_path / "out-again")
    # a prompt-tuning run folder (the method itself arrives later): its adapter config is what decides
    prompt = tmp_path / "prompt"
    prompt.mkdir()
    shutil.copyfile(trained / "recipe.toml", prompt / "recipe.toml")
    info = json.loads((trained / "peft_ft.json").read_text())
    (prompt / "peft_ft.json").write_text(json.dumps({**info, "method": "prompt_tuning"}))
    PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, base_model_name_or_path=str(tiny_bert)).save_pretrained(prompt)
    with pytest.raises(PeftFtError, match=r"'prompt_tuning' \(PROMPT_TUNING\) cannot be merged: it learns virtual tokens"):
        merge_run(prompt, tmp_path / "out-prompt")
    assert not (tmp_path / "out-prompt").exists()


def test_cli_merge_and_the_merged_folder_serves_like_a_run(trained, tmp_path, capsys):
    from peft_ft.cli import main
    from peft_ft.serving.pipelines import pipeline

    out = tmp_path / "m"
    assert main(["merge", str(trained), "--out", str(out)]) == 0
    assert f"merged: {out}" in capsys.readouterr().out
    assert main(["merge", str(trained), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [a["label"] for a in pipeline(out)(TEXTS)] == [a["label"] for a in pipeline(trained)(TEXTS)]


# --- combining LoRA adapters (--combine) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def two_adapters(trained, tmp_path_factory, tiny_bert) -> tuple[Path, Path]:
    """The module's LoRA run and one trained on flipped labels: same base, task and labels, different answers."""
    return trained, train_sentiment(tmp_path_factory.mktemp("combine"), tiny_bert, "flip", flip=True)


def logits_of(run_dir: Path):
    import torch

    from peft_ft.rundir.load import load_run

    model, tokenizer, _ = load_run(run_dir)
    with torch.inference_mode():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


def test_linear_combination_with_weights_one_and_zero_is_the_first_adapter(two_adapters, tmp_path):
    import torch

    from peft_ft.cli import main

    first, second = two_adapters
    out = tmp_path / "combined"
    assert main(["merge", "--combine", f"a={first}:1,b={second}:0", "--how", "linear", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "labels.json", "peft_ft.json", "recipe.toml"]
    # it travels as a trained run does: the base by its portable name, labels.json, no path of this machine
    config, first_config = (json.loads((d / "adapter_config.json").read_text()) for d in (out, first))
    assert config["base_model_name_or_path"] == first_config["base_model_name_or_path"] == first_config["base_model_name_or_path"].split("/")[-1]
    assert (out / "labels.json").read_text() == (first / "labels.json").read_text()
    from peft_ft.rundir.layout import read_info

    assert read_info(out)["base_model"] == read_info(first)["base_model"]  # the local base, found from here too
    for path in out.iterdir():
        if path.suffix != ".safetensors":
            assert str(tmp_path) not in path.read_text() and str(first.parent) not in path.read_text(), path.name
    info = json.loads((out / "peft_ft.json").read_text())
    assert [c["weight"] for c in info["combined_from"]] == [1.0, 0.0] and info["combination"]["how"] == "linear"
    assert torch.allclose(logits_of(out), logits_of(first), atol=1e-5, rtol=0)
    assert not torch.allclose(logits_of(out), logits_of(second), atol=1e-2)  # (the two adapters do differ)


def test_a_combined_folder_has_a_card_whose_snippet_loads_it_with_stock_tools(two_adapters, tmp_path, tiny_bert):
    import re

    from peft_ft.serving.combine import combine_runs
    from peft_ft.serving.pipelines import pipeline

    first, second = two_adapters
    out = combine_runs([("a", first, 1.0), ("b", second, 0.0)], "linear", tmp_path / "combined")
    card = (out / "README.md").read_text()
    # the local base by its folder name only, no path of this machine (relative or absolute)
    assert f"base `{tiny_bert.name}`" in card and "../" not in card and str(tiny_bert.parent) not in card and str(tmp_path) not in card
    assert "## Usage with transformers and peft" in card and "peft_ft.rundir" not in card
    [code] = re.findall(r"```python\n(.*?)```", card, flags=re.S)  # a local base: PeftModel on the base folder
    code = code.replace(f'"path/to/{tiny_bert.name}"', repr(str(tiny_bert))).replace("print(pipe(", "(pipe(")
    check = ("import sys as _s, json as _j\nassert not [m for m in _s.modules if m.startswith('peft_ft')]\n"
             f"print(_j.dumps([a['label'] for a in pipe({TEXTS!r})]))\n")
    done = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    labels = json.loads(done.stdout.strip().splitlines()[-1])
    assert labels == [a["label"] for a in pipeline(first)(TEXTS)] and set(labels) == {"neg", "pos"}  # weights (1, 0): the first


@pytest.mark.parametrize("how", ["ties", "dare_ties", "dare_linear", "cat"])
def test_ties_dare_and_cat_give_an_adapter_that_predict_merge_and_a_plain_pipeline_load(how, two_adapters, tmp_path, tiny_bert):
    import torch
    import transformers

    from peft_ft.rundir.load import label_kwargs
    from peft_ft.serving.combine import combine_runs
    from peft_ft.serving.pipelines import pipeline

    first, second = two_adapters
    out = combine_runs([("a", first, 0.5), ("b", second, 0.5)], how, tmp_path / "combined",
                       density=0.5 if how != "cat" else None)
    ours = pipeline(out)(TEXTS)
    # stock code, as the card shows for a base that is a local folder (no name another machine resolves)
    from peft import PeftModel

    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert, **label_kwargs(out))
    stock = PeftModel.from_pretrained(base, str(out))
    plain = transformers.pipeline("text-classification", model=stock, tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_bert))(TEXTS)
    assert [o["label"] for o in ours] == [p["label"] for p in plain] and all(o["label"] in ("pos", "neg") for o in ours)
    assert [o["score"] for o in ours] == pytest.approx([p["score"] for p in plain], abs=1e-5)
    merged = merge_run(out, tmp_path / "merged")  # a combined adapter folds into its base like a trained one
    from peft_ft.rundir.load import load_run

    model, tokenizer, _ = load_run(merged)
    with torch.inference_mode():
        assert torch.allclose(model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits, logits_of(out), atol=1e-4)


def test_combining_refuses_other_tasks_methods_and_options(two_adapters, tmp_path, tiny_bert):
    from helpers import train_ner
    from peft_ft.serving.combine import combine_runs, parse_combine

    first, second = two_adapters
    ner = train_ner(tmp_path, tiny_bert)
    with pytest.raises(PeftFtError, match=r"b \(.*\): task 'ner' differs from a's 'classification'"):
        combine_runs([("a", first, 1.0), ("b", ner, 1.0)], "linear", tmp_path / "x")
    ia3 = train_sentiment(tmp_path, tiny_bert, "ia3", method="ia3")
    with pytest.raises(PeftFtError, match=r"method 'ia3'; only LoRA adapters combine"):
        combine_runs([("a", first, 1.0), ("b", ia3, 1.0)], "linear", tmp_path / "x")
    with pytest.raises(PeftFtError, match=r"--density applies to --how ties, dare_ties, dare_linear"):
        combine_runs([("a", first, 1.0), ("b", second, 1.0)], "linear", tmp_path / "x", density=0.3)
    with pytest.raises(PeftFtError, match=r"expected NAME=RUN_DIR:WEIGHT"):
        parse_combine(f"a={first},b={second}:1")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("weight", ["nan", "inf", "-Infinity"])
def test_a_weight_that_is_not_a_finite_number_is_refused(tmp_path, weight):
    """NaN passed every check (NaN <= 0 is False): merge --combine wrote a folder of NaN weights, exit 0."""
    from peft_ft.serving.combine import parse_combine, parse_inference_combine

    with pytest.raises(PeftFtError, match="with a finite number as WEIGHT"):
        parse_combine(f"a={tmp_path}:{weight},b={tmp_path}:1")
    with pytest.raises(PeftFtError, match="with a finite number as WEIGHT"):
        parse_inference_combine(f"avg=g:{weight},h:1", {"g": str(tmp_path), "h": str(tmp_path)})


# --- stacking and averaging at inference (predict / serve --combine) ------------------------------------------


def test_cat_with_weights_one_one_is_both_adapters_active_at_once(two_adapters, tmp_path):
    """`--how cat` with weights (1, 1) gives every LoRA layer the sum of both updates: what peft computes with both
    adapters active at once (its LoRA stacking); the head is the two heads' average."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from peft_ft.rundir.layout import read_info
    from peft_ft.rundir.load import base_location
    from peft_ft.serving.combine import _split_state, combine_runs

    first, second = two_adapters
    stacked = combine_runs([("a", first, 1.0), ("b", second, 1.0)], "cat", tmp_path / "stacked")
    info = read_info(first)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_location(info), num_labels=2)
    model, heads = None, []
    for name, run_dir in (("a", first), ("b", second)):
        config = LoraConfig.from_pretrained(str(run_dir))
        config.task_type, config.modules_to_save = None, None  # LoRA parts only: peft activates one head at a time
        lora, head = _split_state(run_dir, info["heads"])
        model = get_peft_model(base, config, adapter_name=name) if model is None else model
        if name != "a":
            model.add_adapter(name, config)
        set_peft_model_state_dict(model, lora, adapter_name=name)
        heads.append({k.removeprefix("base_model.model."): v for k, v in head.items()})
    model.base_model.set_adapter(["a", "b"])  # both LoRA adapters active: their updates add up
    model.eval()  # (LoRA dropout off)
    classifier = model.base_model.model.classifier
    with torch.no_grad():
        for key in ("weight", "bias"):
            getattr(classifier, key).copy_((heads[0][f"classifier.{key}"] + heads[1][f"classifier.{key}"]) / 2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_location(info))
    with torch.inference_mode():
        both_active = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    assert torch.allclose(logits_of(stacked), both_active, atol=1e-5, rtol=0)


def test_predict_answers_under_a_combination_beside_the_adapters(two_adapters, tmp_path, capsys, monkeypatch):
    import tempfile

    from peft_ft.cli import main

    first, second = two_adapters
    # A temp folder of this test's own: tests in other workers combine adapters in the shared one at the same time.
    own_tmp = tmp_path / "tmp"
    own_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(own_tmp))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t, "adapter": name}) + "\n" for name in ("a", "b", "first_only", "avg")
                            for t in TEXTS))
    assert main(["predict", "--adapter", f"a={first}", "--adapter", f"b={second}", "--combine", "first_only=a:1,b:0",
                 "--combine", "avg=a:0.5,b:0.5", "--adapter-field", "adapter", str(rows)]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by = {name: [a for a in answers if a["adapter"] == name] for name in ("a", "b", "first_only", "avg")}
    assert [a["label"] for a in by["first_only"]] == [a["label"] for a in by["a"]]  # weights (1, 0): adapter a itself
    assert [a["score"] for a in by["first_only"]] == pytest.approx([a["score"] for a in by["a"]], abs=1e-5)
    assert [a["score"] for a in by["avg"]] != pytest.approx([a["score"] for a in by["a"]], abs=1e-3)
    assert list(own_tmp.iterdir()) == []  # the combined folders are gone


def test_predict_combine_refusals_name_the_problem(two_adapters, tmp_path):
    first, second = two_adapters
    (tmp_path / "in.txt").write_text("good film\n")
    cases = {
        ("--combine", "avg=a:0.5,c:0.5"): "'c' not given with --adapter",
        ("--combine", "a=a:0.5,b:0.5"): "'a' already names an --adapter",
        ("--combine", "avg"): "expected NAME=ADAPTER:WEIGHT",
        ("--combine", "avg=a:x,b:1"): "'a:x': expected ADAPTER:WEIGHT with a finite number as WEIGHT",
        ("--how", "ties"): "--how and --density apply to --combine",
    }
    for extra, message in cases.items():
        done = subprocess.run([sys.executable, "-m", "peft_ft", "predict", "--adapter", f"a={first}", "--adapter", f"b={second}",
                               *extra, str(tmp_path / "in.txt")], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert message in done.stderr, (extra, done.stderr)


def test_merge_and_combine_print_only_their_result(two_adapters, tmp_path):
    """A merge imported DeepSpeed through transformers' save (it prints "Setting accelerator to CPU"), and a combine
    passed users' names ("a") to peft, which warned that they lie inside its "lora_" prefix, and the base's path, which
    peft warned had replaced the config's name."""
    import subprocess
    import sys

    first, second = two_adapters
    code = "import sys; from peft_ft.cli import main; code = main(sys.argv[1:]); print('deepspeed', 'deepspeed' in sys.modules); sys.exit(code)"
    for args in (["merge", str(first), "--out", str(tmp_path / "merged")],
                 ["merge", "--combine", f"a={first}:0.5,lora={second}:0.5", "--out", str(tmp_path / "combined")]):
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.splitlines()[-1] == "deepspeed False" and done.stderr == "", done.stderr[-2000:]
