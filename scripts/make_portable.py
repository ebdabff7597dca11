"""Bring a run folder written before portable folders (peft-ft <= the first shipped adapters) up to date,
without retraining: the weights stay, the metadata is rewritten as `peft-ft run` writes it now.

    python scripts/make_portable.py adapters/conll_lora [--data-dir ../shared/data] [--rescore]

- adapter_config.json names the base portably (the embedded MiniLM: its hub id); labels.json is written;
- peft_ft.json loses the run folder's path; data sources become relative to the data folder;
- recipe.toml keeps its text, with an absolute output.dir (or data.dir, model.name) shortened and said so;
- metrics.json: classification splits get `macro_f1_all_classes`, `classes_present` and `scorers`, derived
  from their stored per-class F1 (checked against the stored macro-F1); with --rescore, NER splits are
  predicted again from the data (no training) and get the conlleval scores, after checking that the
  seqeval F1 of the new predictions equals the stored one;
- README.md is regenerated from these files (peft_ft.rundir.card).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from peft_ft.models.loading import EMBEDDED_NAME
from peft_ft.recipe.load import load_recipe
from peft_ft.rundir.card import model_card
from peft_ft.rundir.portable import data_sources, finish_adapter_config, portable_toml, write_labels
from peft_ft.storage import write_atomic, write_json


def old_data_dir(info: dict, recipe) -> str | None:
    """The data folder of the training machine: the train source less the recipe's relative train file."""
    train = info["data"].get("train", "")
    if recipe.data.hub or not recipe.data.train or not train.endswith(recipe.data.train):
        return None
    return train[: -len(recipe.data.train)].rstrip("/") or None


def portable_info(info: dict, recipe, data_dir: str | None) -> dict:
    info = {k: v for k, v in info.items() if k != "run_dir"}
    if info["base_model"] == EMBEDDED_NAME:
        from peft_ft.models.hub_cache import EMBEDDED_HUB_ID

        base = {"base_model_id": EMBEDDED_HUB_ID, "base_model_source": "embedded"}
    elif Path(info["base_model"]).is_absolute():
        base = {"base_model_id": Path(info["base_model"]).name, "base_model_source": "local folder"}
    else:
        base = {"base_model_id": info["base_model"], "base_model_source": "hub"}
    ordered = {}
    for key, value in info.items():
        ordered[key] = value
        if key == "base_model":
            ordered.update(base)
    ordered["data"] = data_sources(info["data"], Path(data_dir) if data_dir else None)
    return ordered


def classification_extras(metrics: dict, labels: list[str]) -> None:
    """`macro_f1_all_classes`, `classes_present` and `scorers` from a split's per-class F1. Which classes
    scikit-learn averaged over (present in gold or predictions) is read back from the stored macro-F1:
    the classes with support or a non-zero F1 for sure, and each zero-F1, zero-support class is present
    only if including it reproduces the stored value."""
    import itertools

    for split, m in metrics.items():
        if not isinstance(m, dict) or "per_class" not in m or "macro_f1" not in m:
            continue
        f1 = {n: m["per_class"][n]["f1"] for n in labels}
        sure = [n for n in labels if m["per_class"][n]["support"] or f1[n]]
        unsure = [n for n in labels if n not in sure]
        for k in range(len(unsure) + 1):
            for extra in itertools.combinations(unsure, k):
                present = sure + list(extra)
                if abs(sum(f1[n] for n in present) / len(present) - m["macro_f1"]) < 1e-12:
                    break
            else:
                continue
            break
        else:
            raise SystemExit(f"{split}: no set of classes reproduces macro_f1 {m['macro_f1']}")
        m["macro_f1_all_classes"] = sum(f1.values()) / len(labels)
        m["classes_present"] = [n for n in labels if n in present]
        m["scorers"] = {"macro_f1": f"mean F1 over the {len(present)} classes present in gold or predicted labels",
                        "macro_f1_all_classes": f"mean F1 over all {len(labels)} classes"}


def rescore_ner(run_dir: Path, metrics: dict, data_dir: str | None) -> None:
    """Predict the NER splits again (the stored adapter, the stored recipe) and add the conlleval scores."""
    from peft_ft.data.files import resolve_data_dir
    from peft_ft.rundir.load import load_run
    from peft_ft.tasks import TASKS
    from peft_ft.tasks.ner import conlleval_metrics, entity_metrics, word_predictions

    model, tokenizer, info = load_run(run_dir)
    recipe = load_recipe(run_dir / "recipe.toml")
    task = TASKS["ner"]
    data = task.load(recipe, resolve_data_dir(recipe, data_dir))
    for name, split in data.splits.items():
        if name == "train" or name not in metrics:  # metrics["train"] is the training summary
            continue
        features = task.encode(split, tokenizer, recipe, data)
        outputs = task.predict(model, features, tokenizer.pad_token_id or 0, recipe.eval.batch_size, "cpu")
        predicted, _ = word_predictions(split.examples, features, outputs)
        gold = [[data.labels[t] for t in e["tags"]] for e in split.examples]
        tags = [[data.labels[t] for t in row] for row in predicted]
        again = entity_metrics(gold, tags, metrics[name].get("seqeval_mode", "strict"))
        if abs(again["f1"] - metrics[name]["f1"]) > 1e-12:
            raise SystemExit(f"{name}: predicted again, seqeval F1 {again['f1']} differs from the stored {metrics[name]['f1']}")
        metrics[name].update(conlleval_metrics(gold, tags))
        metrics[name]["scorers"] = again["scorers"]
        print(f"{name}: seqeval F1 {again['f1']:.6f} (= stored), conlleval F1 {metrics[name]['conlleval_f1']:.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--data-dir", default=None, help="data folder for --rescore (default: the recipe's data.dir)")
    parser.add_argument("--rescore", action="store_true", help="predict NER splits again to add the conlleval scores")
    args = parser.parse_args()
    for run_dir in map(Path, args.run_dirs):
        text = (run_dir / "recipe.toml").read_text(encoding="utf-8")
        source = text.splitlines()[0].removeprefix("# resolved from ").strip()
        recipe = dataclasses.replace(load_recipe(run_dir / "recipe.toml"), source=source)
        info = json.loads((run_dir / "peft_ft.json").read_text(encoding="utf-8"))
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        info = portable_info(info, recipe, old_data_dir(info, recipe))
        if info["task"] == "classification":
            classification_extras(metrics, info["labels"])
        if info["task"] == "ner" and args.rescore:
            rescore_ner(run_dir, metrics, args.data_dir)
        if info["is_adapter"]:
            finish_adapter_config(run_dir, info)
        write_labels(run_dir, info["labels"])
        write_json(run_dir / "peft_ft.json", info)
        write_json(run_dir / "metrics.json", metrics)
        write_atomic(run_dir / "recipe.toml", portable_toml(text))
        portable = dataclasses.replace(load_recipe(run_dir / "recipe.toml"), source=source)
        write_atomic(run_dir / "README.md", model_card(portable, info, metrics, folder_name=run_dir.name))
        print(f"{run_dir}: portable")


if __name__ == "__main__":
    main()
