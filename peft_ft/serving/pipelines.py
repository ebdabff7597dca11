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

import inspect
from pathlib import Path

from peft_ft.errors import PeftFtError
from peft_ft.models.loading import check_answer_device
from peft_ft.rundir.layout import read_recipe
from peft_ft.rundir.load import check_run_folder, load_run
from peft_ft.tasks import TASKS


def pipeline(run_dir: str | Path, device: str = "cpu", **kwargs):
    """The answering callable of a run folder (adapter, full or merged run), with real label names.

    `text-classification` runs get a stock transformers pipeline; NER runs get `WordTagger` (whole
    words, every word of a long text, as the evaluation decides them); QA and seq2seq runs get
    `QuestionAnswerer` / `Generator`, because transformers 5 no longer has those pipelines. Each is wrapped in
    `RunPipeline`, which takes the inputs `peft-ft predict` takes. `kwargs` go to `transformers.pipeline` (stock
    pipelines only), except `allow_pickle=True`, which lets a folder holding pickle files load (see
    peft_ft.models.safety), and `trust_remote_code=True`, which lets the base model's own Python code run (the
    run's recipe.toml cannot).
    """
    if not isinstance(run_dir, (str, Path)) or not str(run_dir).strip():
        raise PeftFtError(f"peft_ft.pipeline: run_dir is {run_dir!r}; give the path of a run folder")
    switches = {key: kwargs.pop(key, False) for key in ("allow_pickle", "trust_remote_code")}
    for key, value in switches.items():  # a safety switch only on a real True: the string "false" is truthy
        if not isinstance(value, bool):
            raise PeftFtError(f"peft_ft.pipeline: {key}={value!r}; it takes True or False")
    check_answer_device(device, "device")  # before the folder's checks: a device this torch lacks needs no folder read
    info = check_run_folder(Path(run_dir), switches["allow_pickle"])
    answers = TASKS[info["task"]].answers
    _check_options(answers.build, kwargs, info["task"])  # before the model loads: a misspelt option costs no seconds
    model, tokenizer, info = load_run(run_dir, device, **switches, checked=True)
    recipe = read_recipe(Path(run_dir))
    return RunPipeline(answers.build(model, tokenizer, recipe, **kwargs), answers, recipe)


def _check_options(build, kwargs: dict, task: str) -> None:
    """The options a family's callable takes by its signature; a stock pipeline's builder takes any (**kwargs), and
    transformers checks those itself."""
    try:
        inspect.signature(build).bind(None, None, None, **kwargs)  # model, tokenizer, recipe
    except TypeError as e:
        raise PeftFtError(f"peft_ft.pipeline: {e}; the {task} family takes no such option") from None


class RunPipeline:
    """A run's answering callable, taking what `peft-ft predict` takes: a text, a dict of a row's fields (`text`,
    `text_pair` or the run's own column names, `tokens`, `question` and `context`...), or a list of them; each is
    checked and turned into the family's input by the family's own `to_input`, so a malformed one is a PeftFtError
    naming it. The answers are the family callable's own (a stock pipeline's `{"label", "score"}`, NER entities, QA
    `{"answer", "score", "start", "end"}`, `[{"generated_text"}]`), for one input as for a list."""

    def __init__(self, answerer, answers, recipe):
        self.answerer, self.answers, self.recipe = answerer, answers, recipe

    def __call__(self, inputs, batch_size: int = 32, **kwargs):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise PeftFtError(f"batch_size={batch_size!r}: give a whole number of 1 or more")
        single = isinstance(inputs, (str, dict))
        items = [inputs] if single else inputs
        if not isinstance(items, (list, tuple)) or not items:
            raise PeftFtError(f"inputs: expected a text, a dict of fields or a non-empty list of them, got {_shown(inputs)}")
        converted = [self._input(item, f"input {i}") for i, item in enumerate(items, 1)]
        # one input goes in alone: the family callable answers it in its own single-input shape (a stock
        # text-classification pipeline gives [dict] for one text, as users of transformers expect)
        return self.answerer(converted[0] if single else converted, batch_size=batch_size, **kwargs)

    def _input(self, item, where: str):
        if isinstance(item, str):
            item = {"text": item}  # a plain text is the row {"text": ...}, as a text-lines file gives predict
        if not isinstance(item, dict):
            raise PeftFtError(f"{where}: expected a text or a dict of fields, got {_shown(item)}")
        return self.answers.to_input(item, self.recipe, where)

    def __getattr__(self, name):  # the family callable's own attributes (model, tokenizer, task ...)
        if name == "answerer":  # not set yet (copy and pickle make the object without __init__): no recursion
            raise AttributeError(name)
        return getattr(self.answerer, name)


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
