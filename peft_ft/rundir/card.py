"""README.md of a run folder: a Hugging Face model card (YAML front matter), what was trained on what,
how well by which scorer, and how to load it with stock transformers + peft (no peft-ft import).

The front matter follows the Hub's model-card metadata: `base_model`, `library_name` (`peft` for an
adapter, `transformers` for a full or merged model), `pipeline_tag`, `datasets` and `model-index`,
whose metric entries name their scorer (seqeval strict or conlleval rules, which classes a macro-F1
averages over). The usage snippets are the ones tests/test_portable.py runs, from a copy of the
folder, in a fresh interpreter with `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

from pathlib import Path

from peft_ft.recipe.schema import Recipe
from peft_ft.storage import human_size
from peft_ft.tasks.classification import settings

# metrics.json key -> (model-index metric type, what it is and how it was scored)
METRIC_NAMES = {
    "ner": {
        "f1": ("f1", "entity F1, {seqeval}"),
        "precision": ("precision", "entity precision, {seqeval}"),
        "recall": ("recall", "entity recall, {seqeval}"),
        "conlleval_f1": ("f1", "entity F1, conlleval rules"),
        "conlleval_precision": ("precision", "entity precision, conlleval rules"),
        "conlleval_recall": ("recall", "entity recall, conlleval rules"),
        "accuracy": ("accuracy", "word accuracy"),
    },
    "classification": {
        "accuracy": ("accuracy", "accuracy"),
        "macro_f1": ("f1", "macro-F1 over the classes present in the split ({present})"),
        "macro_f1_all_classes": ("f1", "macro-F1 over all {all} classes"),
        "weighted_f1": ("f1", "support-weighted F1"),
        "matthews": ("matthews_correlation", "Matthews correlation"),
        "f1": ("f1", "F1 of the positive class"),
        "pearson": ("pearsonr", "Pearson correlation"),
        "spearman": ("spearmanr", "Spearman correlation"),
    },
    "qa": {"exact_match": ("exact_match", "exact match, SQuAD v1.1 script rules (percent)"),
           "f1": ("f1", "token F1, SQuAD v1.1 script rules (percent)")},
    "seq2seq": {"exact_match": ("exact_match", "exact match, SQuAD v1.1 script rules (percent)"),
                "f1": ("f1", "token F1, SQuAD v1.1 script rules (percent)")},
}
PIPELINE_TAGS = {"ner": "token-classification", "classification": "text-classification", "qa": "question-answering",
                 "seq2seq": "text2text-generation"}


def metric_entries(task: str, metrics: dict, labels: list[str]) -> list[tuple[str, str, float]]:
    """(metric type, name with its scorer, value) of one split's metrics, in METRIC_NAMES order."""
    seqeval = metrics.get("scorers", {}).get("f1") or f"seqeval {metrics.get('seqeval_mode', 'strict')}"
    present = metrics.get("classes_present")
    fill = {"seqeval": seqeval, "all": len(labels),
            "present": f"{len(present)} of {len(labels)}" if present is not None else "scikit-learn's default"}
    return [(kind, name.format(**fill), float(metrics[key]))
            for key, (kind, name) in METRIC_NAMES.get(task, {}).items() if isinstance(metrics.get(key), (int, float))]


def dataset_name(source: str, data_folder: str = "") -> str:
    """`conll2003/test.txt` -> conll2003; `hub:org/name:split` -> org/name; a file directly in the data
    folder -> the data folder's name (else the file's stem)."""
    if source.startswith("hub:"):
        return source.split(":")[1]
    path = source.split(" of ")[-1]  # "10% of scientsbank/train.parquet"
    parts = Path(path).parts
    return parts[0] if len(parts) > 1 else data_folder or Path(path).stem


def front_matter(info: dict, metrics: dict) -> dict:
    task = info["task"]
    evaluated = {s: m for s, m in metrics.items() if isinstance(m, dict) and s not in ("train", "params")}
    folder = Path(info["data_dir"]).name if info.get("data_dir") else ""
    datasets = sorted({dataset_name(src, folder) for src in info["data"].values()})
    results = []
    for split, m in evaluated.items():
        entries = metric_entries(task, m, info["labels"])
        if not entries:
            continue
        name = dataset_name(info["data"].get(split, split), folder)
        results.append({
            "task": {"type": PIPELINE_TAGS[task]},
            "dataset": {"name": name, "type": name, "split": split},
            "metrics": [{"type": kind, "name": label, "value": round(value, 4)} for kind, label, value in entries],
        })
    meta = {
        "base_model": info.get("base_model_id") or info["base_model"],
        "library_name": "peft" if info["is_adapter"] else "transformers",
        "pipeline_tag": PIPELINE_TAGS[task],
        "tags": ["peft-ft", info["method"]],
        "datasets": datasets,
        "model-index": [{"name": info["run_name"], "results": results}],
    }
    return meta


def model_card(recipe: Recipe, info: dict, metrics: dict, folder_name: str | None = None) -> str:
    """The whole README.md. `folder_name` is what the snippets call the folder (default: the run name)."""
    import yaml

    folder = folder_name or info["run_name"]
    if info["task"] == "classification":
        info = {**info, "text_pair": bool(settings(recipe).text_pair)}  # the snippet's example input
    meta = yaml.safe_dump(front_matter(info, metrics), sort_keys=False, allow_unicode=True, width=200)
    lines = [
        "---", meta.rstrip(), "---", "",
        f"# {info['run_name']}",
        "",
        f"Trained with peft-ft from `{recipe.source}` (resolved copy: `recipe.toml`).",
        "",
        f"- base model: `{info.get('base_model_id') or info['base_model']}` ({info['model_type']}){_base_note(info)}",
        f"- method: `{info['method']}`",
        f"- task: `{info['task']}`" + (f"; labels (`labels.json`): {', '.join(info['labels'])}" if info["labels"] else ""),
        "- data (relative to the data folder): " + "; ".join(f"{k}: `{v}`" for k, v in info["data"].items()),
        f"- trainable parameters: {info['trainable_params']:,} of {info['total_params']:,} ({info['trainable_percent']:.3f} %)",
        f"- saved weights: {', '.join(info['weight_files'])} ({human_size(info['weight_bytes'])})",
        f"- training: {info['train']['epochs_run']} epoch(s), {info['train']['steps']} steps, "
        f"{info['train']['seconds']:.0f} s, best epoch {info['train']['best_epoch']} by validation {info['train']['best_metric']}",
        "",
        "## Metrics",
        "",
        "| split | metric (scorer) | value |",
        "|---|---|---|",
    ]
    for split, m in metrics.items():
        if isinstance(m, dict) and split not in ("train", "params"):
            lines += [f"| {split} | {name} | {value:.4f} |" for _, name, value in metric_entries(info["task"], m, info["labels"])]
    lines += ["", "## Usage with transformers and peft", "", *usage(info, folder), ""]
    return "\n".join(lines)


def _base_note(info: dict) -> str:
    source = info.get("base_model_source")
    if source == "embedded":
        return ("; offline it resolves from the hub cache once peft-ft has registered it there "
                "(`peft-ft register-embedded`, or any `peft-ft run` on it)")
    if source == "local folder":
        return "; a local folder of the training machine, not a hub id: the snippets take its path"
    return ""


def usage(info: dict, folder: str) -> list[str]:
    """Markdown: one python block per loading path (each runs on its own)."""
    task = info["task"]
    if not info["is_adapter"]:
        return _block(_full_snippet(task, folder))
    if info["method"] in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        notes = ["Prompt-learning adapters prepend virtual tokens that stock pipelines do not strip: "
                 "load the model as below and use `peft_ft.pipeline(DIR)` for answers."]
        return [*notes, "", *_block(_peft_model_snippet(info, folder, pipeline=False))]
    blocks = []
    if info.get("base_model_source") == "local folder":
        pass  # AutoPeftModel loads the base named in adapter_config.json, which is no path here
    elif task in ("ner", "classification"):
        blocks += ["Loading with `AutoPeftModel`:", "", *_block(_auto_snippet(info, folder)), ""]
    elif task == "qa":
        blocks += ["Loading with `AutoPeftModel` (transformers 5 has no question-answering pipeline):", "",
                   *_block(_qa_snippet(info, folder)), ""]
    blocks += ["Loading the base, then the adapter:", "", *_block(_peft_model_snippet(info, folder, pipeline=task in PIPE))]
    if task == "ner":
        blocks += ["", "Stock pipelines group subwords by their own rules (they split `AL-AIN` at the hyphen); "
                   "`peft_ft.pipeline(DIR)` and `peft-ft predict` answer per whitespace word with the label of its "
                   "first subword, as the evaluation scores."]
    return blocks


def _block(code: str) -> list[str]:
    return ["```python", code.rstrip(), "```"]


PIPE = {"ner": 'pipe = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="first")\n'
               'print(pipe("John Smith flew from London to Berlin."))',
        "classification": 'pipe = pipeline("text-classification", model=model, tokenizer=tokenizer)\n'
                          'print(pipe({TEXT}))'}
AUTO = {"ner": ("AutoPeftModelForTokenClassification", "AutoModelForTokenClassification"),
        "classification": ("AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification"),
        "qa": ("AutoPeftModel", "AutoModelForQuestionAnswering"),
        "seq2seq": ("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM")}


def _label_lines(info: dict) -> tuple[str, str]:
    """The labels line and the keyword arguments that pass them (none for QA / seq2seq)."""
    if not info["labels"]:
        return "", ""
    extra = ', problem_type="regression"' if len(info["labels"]) == 1 else ""
    return (f'labels = json.load(open(f"{{DIR}}/labels.json"))  # label names in id order\n',
            f"id2label=dict(enumerate(labels)), label2id={{n: i for i, n in enumerate(labels)}}{extra}")


def _pipe_code(info: dict) -> str:
    text = '{"text": "Plants need water to grow.", "text_pair": "Plants need water and light."}' \
        if info.get("text_pair") else '"This is great."'
    return PIPE[info["task"]].replace("{TEXT}", text)


def _base_expr(info: dict) -> tuple[str, str]:
    """(a line defining BASE, or "", the expression that names the base)."""
    if info.get("base_model_source") == "local folder":
        return f'BASE = "path/to/{info["base_model_id"]}"  # the local base folder it was trained on\n', "BASE"
    return "", repr(info.get("base_model_id") or info["base_model"])


def _auto_snippet(info: dict, folder: str) -> str:
    auto, _ = AUTO[info["task"]]
    labels_line, kwargs = _label_lines(info)
    _, base = _base_expr(info)
    code = (f"import json\n\nfrom peft import {auto}\nfrom transformers import AutoTokenizer, pipeline\n\n"
            f'DIR = "{folder}"  # this folder\n{labels_line}'
            f"model = {auto}.from_pretrained(DIR{', ' + kwargs if kwargs else ''}).eval()\n"
            f"tokenizer = AutoTokenizer.from_pretrained({base})\n{_pipe_code(info)}\n")
    return code


def _peft_model_snippet(info: dict, folder: str, pipeline: bool) -> str:
    _, auto = AUTO[info["task"]]
    labels_line, kwargs = _label_lines(info)
    base_line, base = _base_expr(info)
    imports = f"from transformers import {auto}, AutoTokenizer" + (", pipeline" if pipeline else "")
    first = "import torch\n" if info["task"] == "qa" else "import json\n"
    code = (f"{first}\nfrom peft import PeftModel\n{imports}\n\n"
            f'DIR = "{folder}"  # this folder\n{base_line}{labels_line}'
            f"base = {auto}.from_pretrained({base}{', ' + kwargs if kwargs else ''})\n"
            f"model = PeftModel.from_pretrained(base, DIR).eval()\n"
            f"tokenizer = AutoTokenizer.from_pretrained({base})\n")
    if info["task"] == "qa":
        return code + QA_ANSWER
    return code + (_pipe_code(info) + "\n" if pipeline else "")


QA_ANSWER = """question, context = "Where does the Eiffel Tower stand?", "The Eiffel Tower stands in Paris, the capital of France."
inputs = tokenizer(question, context, return_tensors="pt", truncation="only_second", max_length=384)
with torch.no_grad():
    out = model(**inputs)
in_context = torch.tensor([s == 1 for s in inputs.sequence_ids(0)])  # the answer lies in the context
start_logits = out.start_logits[0].masked_fill(~in_context, -1e9)
end_logits = out.end_logits[0].masked_fill(~in_context, -1e9)
start = int(start_logits.argmax())
end = start + int(end_logits[start:start + 30].argmax())
answer = context[inputs.token_to_chars(0, start).start:inputs.token_to_chars(0, end).end]
print(answer)
"""


def _qa_snippet(info: dict, folder: str) -> str:
    _, base = _base_expr(info)
    return (f"import torch\nfrom peft import AutoPeftModel\nfrom transformers import AutoTokenizer\n\n"
            f'DIR = "{folder}"  # this folder\n'
            f"model = AutoPeftModel.from_pretrained(DIR).eval()  # the generic PeftModel passes token_type_ids on\n"
            f"tokenizer = AutoTokenizer.from_pretrained({base})\n{QA_ANSWER}")


def _full_snippet(task: str, folder: str) -> str:
    if task in ("ner", "classification"):
        kind = PIPELINE_TAGS[task]
        extra = ', aggregation_strategy="first"' if task == "ner" else ""
        return (f"from transformers import pipeline\n\n"
                f'pipe = pipeline("{kind}", model="{folder}"{extra})  # a complete model folder with its labels\n'
                f'print(pipe("John Smith flew from London to Berlin."))\n')
    _, auto = AUTO[task]
    return (f"from transformers import {auto}, AutoTokenizer\n\n"
            f'model = {auto}.from_pretrained("{folder}").eval()  # a complete model folder\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")\n')
