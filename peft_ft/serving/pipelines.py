"""`peft_ft.pipeline(RUN_DIR)`: the answering callable of a trained run.

Each task family says how it answers (`Task.answers`, in its own module under `peft_ft.tasks`): how to build
the callable (a stock transformers pipeline where transformers 5 still has one), how a request row becomes
its input, and how its output becomes our JSON answer. `peft-ft predict`, `peft-ft serve` and
`peft_ft.pipeline` all go through it.

transformers 5 removed the `question-answering` and `text2text-generation` pipelines (asking for
them raises KeyError "has been removed from transformers"). Those two families are answered by small
callables of their own (`QuestionAnswerer`, `Generator`), which run the family's `encode` / `predict`
and take and return what the 4.x pipelines did.

NER answers are `WordTagger`'s: whole words (a request's `tokens`, or a text's words, split as the run's
training text was: at whitespace, or as Label Studio runs were), each with the label of its first subword, every word of a long text (windows at word
boundaries), grouped into entities by conlleval's chunk rules: the decisions the evaluation scores.

Using `transformers.pipeline(task, model=RUN_DIR)` directly on an adapter folder: transformers reads
`adapter_config.json`, loads the base it names (a hub id: peft_ft.rundir.portable) and the trained head from
the adapter file, and finds the base's tokenizer, but the label names come from the *base* config
(`LABEL_0`...), and a label count that differs from it fails with a size mismatch. The names are in
`labels.json` (a list in id order), never in a `config.json` inside the adapter folder (that would
make transformers treat the folder as a full model): pass `model_kwargs=peft_ft.rundir.load.label_kwargs(RUN_DIR)`, or
`id2label=dict(enumerate(labels))` as the run's model card shows, or use `peft_ft.pipeline(RUN_DIR)`.
"""

from __future__ import annotations

from pathlib import Path

from peft_ft.rundir.layout import read_recipe
from peft_ft.rundir.load import load_run
from peft_ft.tasks import TASKS


def pipeline(run_dir: str | Path, device: str = "cpu", **kwargs):
    """The answering callable of a run folder (adapter, full or merged run), with real label names.

    `text-classification` runs get a stock transformers pipeline; NER runs get `WordTagger` (whole
    words, every word of a long text, as the evaluation decides them); QA and seq2seq runs get
    `QuestionAnswerer` / `Generator`, because transformers 5 no longer has those pipelines. `kwargs` go
    to `transformers.pipeline` (stock pipelines only), except `allow_pickle=True`, which lets a folder
    holding pickle files load (see peft_ft.models.safety), and `trust_remote_code=True`, which lets the base
    model's own Python code run (the run's recipe.toml cannot).
    """
    model, tokenizer, info = load_run(run_dir, device, allow_pickle=kwargs.pop("allow_pickle", False),
                                      trust_remote_code=kwargs.pop("trust_remote_code", False))
    return TASKS[info["task"]].answers.build(model, tokenizer, read_recipe(Path(run_dir)), **kwargs)
