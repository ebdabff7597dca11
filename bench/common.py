"""Shared by the benchmark scripts: options, the peft-ft driver, timing records, memory peaks,
the CPU's matmul peak, the FLOP count, tables, and the tiny model and data of `--smoke`.

Imported by scripts run as `python bench/<name>.py` (their folder is then on sys.path). Heavy
libraries are imported inside functions so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# One LoRA setting and one learning rate per method for every runner (the comparison).
LORA = {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "key", "value", "dense"]}
LR = {"lora": 5e-4, "full": 5e-5}
SEED = 42
PAD_TO = 512  # the seeds' approach: every row padded to this many tokens

# The two data sets of the comparison, as peft-ft recipe lines (relative to the data directory).
RECIPE_DATA = {
    "scientsbank": """
[task]
type = "classification"
labels = ["correct", "contradictory", "partially_correct_incomplete", "irrelevant", "non_domain"]
[data]
dir = "{data_dir}"
train = "scientsbank/train.parquet"
text_column = "reference_answer"
text_pair_column = "student_answer"
label_column = "label"
max_train_samples = {max_train_samples}
""",
    "conll": """
[task]
type = "ner"
[data]
dir = "{data_dir}"
train = "conll2003/train.txt"
max_train_samples = {max_train_samples}
""",
}
TASK_TYPE = {"scientsbank": "classification", "conll": "ner"}
DATA_FILES = {"scientsbank": "scientsbank/train.parquet", "conll": "conll2003/train.txt"}  # what each data set reads


@dataclass
class Options:
    """What every configuration of one comparison shares."""

    model_dir: str = ""  # empty: the embedded MiniLM-L6
    data_dir: str = ""
    batch_size: int = 32
    steps: int = 20  # timed optimizer steps
    warmup: int = 2  # untimed steps before them
    max_seconds: float = 0.0  # per configuration; 0 = no cap (otherwise fewer timed steps, reported)
    threads: int = 1
    device: str = "cpu"
    max_train_samples: int = 0  # 0 = the whole training file
    max_length: int = 256
    lora_dropout: float = LORA["dropout"]  # the comparison uses 0.1; 0 measures dropout's cost
    activation_checkpointing: bool = False  # recompute each layer in backward (both runners)
    mixed_precision: str = "no"  # "bf16": peft-ft's train.mixed_precision, the Trainer's bf16=True (both runners)


@dataclass
class Config:
    data: str  # "scientsbank" or "conll"
    runner: str  # "peft-ft" or "trainer"
    method: str  # "lora" or "full"
    batching: str  # "grouped" (length-grouped, padded per batch), "random" (padded per batch), "pad512";
    # peft-ft only: "stock-layers" = grouped with train.fast_kernels off (peft's own LoRA layers and dropout)

    @property
    def label(self) -> str:
        return f"{self.data} {self.runner} {self.method} {self.batching}"


@dataclass
class Measured:
    """What one configuration did in its timed steps: one entry per batch."""

    seconds: float = 0.0
    lengths: list[list[int]] = field(default_factory=list)  # real (non-padding) tokens of each row
    widths: list[int] = field(default_factory=list)  # padded width of each batch
    dims: dict = field(default_factory=dict)  # model shape for the FLOP count (`model_dims`)
    memory: dict = field(default_factory=dict)  # MiB: before (after setup), peak (during training)
    params: dict = field(default_factory=dict)  # trainable, total

    @property
    def steps(self) -> int:
        return len(self.lengths)

    @property
    def samples(self) -> int:
        return sum(len(b) for b in self.lengths)

    @property
    def tokens(self) -> int:
        return sum(sum(b) for b in self.lengths)

    @property
    def computed_tokens(self) -> int:
        return sum(w * len(b) for w, b in zip(self.widths, self.lengths))

    def add_batch(self, lengths: list[int], width: int) -> None:
        self.lengths.append(list(lengths))
        self.widths.append(int(width))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the command line ----------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type of a count (steps, clients, repeats, threads...): 0 or less would run nothing, or
    (a warm-up of 0 = peft-ft's `max_steps = 0`) run without a cap, so argparse refuses it with exit 2."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of a count where 0 means "off" or "all" (`--max-train-samples 0`)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of 0 or more, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type of a duration that must be above 0 (`--seconds`)."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type of a duration where 0 means "no cap" (`--max-seconds 0`)."""
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):  # nan and inf parse, but bound nothing
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def run_main(main, argv=None) -> None:
    """Run a script's `main(argv)` and exit with its status. A problem the user can fix (peft-ft's own
    error types: a missing data folder, a bad recipe) is one `error: ...` line and exit 2, as the
    `peft-ft` CLI prints it; anything else is a bug and keeps its traceback."""
    from peft_ft.errors import PeftFtError

    try:
        status = main(argv)
    except PeftFtError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(status if isinstance(status, int) else 0)


def check_data_dir(data_dir: str, datasets, option: str = "--data-dir", given: bool = True) -> None:
    """Refuse a data folder that lacks a file the chosen data sets read, naming `option`, before anything
    runs: later the error would blame the temporary recipe a script writes for peft-ft, a file the user
    never wrote. `given=False`: the folder is peft-ft's default, which `option` replaces."""
    from peft_ft.errors import DataError

    folder = Path(data_dir).expanduser()
    named = f"{option} {data_dir}" if given else f"{data_dir} (the default data folder: $PEFT_FT_DATA_DIR or ../shared/data)"
    wanted = " and ".join(DATA_FILES[name].split("/")[0] + "/" for name in datasets) or "the recipe's data files"
    hint = f"give {option} the data folder that holds {wanted}"
    if not folder.is_dir():
        raise DataError(f"{named}: {'is not a folder' if folder.exists() else 'does not exist'}; {hint}")
    for name in datasets:
        if not (folder / DATA_FILES[name]).is_file():
            raise DataError(f"{named}: no {DATA_FILES[name]} in it (the {name} training file); {hint}")


def add_option_arguments(parser, steps: int, warmup: int) -> None:
    """The command-line options every script shares (they fill `Options`)."""
    parser.add_argument("--steps", type=positive_int, default=steps, help=f"timed optimizer steps per configuration (default {steps})")
    parser.add_argument("--warmup", type=positive_int, default=warmup, help=f"untimed steps before them (default {warmup})")
    parser.add_argument("--max-seconds", type=non_negative_float, default=0.0,
                        help="cap on the timed part of one configuration; slower ones then run fewer steps (reported)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--max-train-samples", type=non_negative_int, default=0, help="use only the first N training rows (0 = all)")
    parser.add_argument("--model", default="", help="model folder (default: the embedded MiniLM-L6)")
    parser.add_argument("--data-dir", default="", help="data folder holding scientsbank/ and conll2003/ (default: peft-ft's)")
    parser.add_argument("--lora-dropout", type=float, default=LORA["dropout"],
                        help=f"LoRA dropout for every runner (default {LORA['dropout']}, the issue's setting)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="every runner recomputes each layer's activations in backward instead of keeping them")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                        help="bf16 for every runner: peft-ft's train.mixed_precision, the Trainer's bf16=True (CPU autocast)")


def options_from(args, datasets) -> Options:
    """`Options` from the parsed arguments; the data folder is checked for the `datasets` first."""
    data_dir = args.data_dir or default_data_dir()
    check_data_dir(data_dir, datasets, given=bool(args.data_dir))
    return Options(model_dir=args.model, data_dir=data_dir, batch_size=args.batch_size,
                   steps=args.steps, warmup=args.warmup, max_seconds=args.max_seconds, threads=args.threads,
                   device=args.device, max_train_samples=args.max_train_samples,
                   lora_dropout=args.lora_dropout, activation_checkpointing=args.activation_checkpointing,
                   mixed_precision=args.mixed_precision)


def model_root(opts: Options) -> str:
    if opts.model_dir:
        return opts.model_dir
    from peft_ft.models.loading import embedded_model_dir

    return str(embedded_model_dir())


def default_data_dir() -> str:
    """peft-ft's own default ($PEFT_FT_DATA_DIR, or ../shared/data beside the checkout): the first folder
    of peft-ft's list that exists, else the first of the list, for `check_data_dir` to name."""
    from peft_ft.data.files import data_dir_candidates
    from peft_ft.recipe.schema import Recipe

    candidates = [path for path, _ in data_dir_candidates(Recipe(source="bench"))]
    return str(next((p.resolve() for p in candidates if p.is_dir()), candidates[0]))


def ner_registered() -> bool:
    from peft_ft.tasks import TASKS

    return "ner" in TASKS


# --- threads, device, memory ---------------------------------------------------------------------


def setup_torch(opts: Options):
    import torch

    from peft_ft.models.loading import quiet_transformers

    quiet_transformers()  # no load reports or progress bars between the table lines
    torch.set_num_threads(opts.threads)
    return torch.device(opts.device)


def sync(device) -> None:
    """Wait for queued GPU work so a clock reading means what it says."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        torch.cuda.synchronize()


def _status_mib(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024


class PeakMemory:
    """Peak memory between `start()` and `stop()`: max_memory_allocated on CUDA; on CPU the
    kernel's own RSS high-water mark (VmHWM), reset through /proc/self/clear_refs, with a 10 ms
    sampling thread as the fallback where that reset is not allowed."""

    def __init__(self, device):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.before = self.peak = 0.0
        self._thread = None

    def start(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
            return self
        self.before = _status_mib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        except OSError:
            self._sample()
        return self

    def _sample(self) -> None:
        import threading

        self._stop = threading.Event()
        self._sampled = self.before

        def loop():
            while not self._stop.wait(0.01):
                self._sampled = max(self._sampled, _status_mib("VmRSS"))

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._sampled, _status_mib("VmRSS"))
        else:
            self.peak = _status_mib("VmHWM")
        kind = "cuda_allocated" if self.cuda else "rss"
        return {"kind": kind, "before_mib": round(self.before, 1), "peak_mib": round(self.peak, 1)}


# --- the machine's matmul peak and the model's FLOPs ---------------------------------------------


def matmul_peak(threads: int, seconds: float = 2.0, rows: int = 2048, device: str = "cpu") -> float:
    """FLOP/s of a float32 (rows x 384) @ (384 x 1536) matmul loop, MiniLM's feed-forward shape:
    the best of five timed bursts after a warm-up, on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.randn(rows, 384, device=device)
    w = torch.randn(384, 1536, device=device)
    flops = 2 * rows * 384 * 1536
    for _ in range(3):
        x @ w
    best = 0.0
    for _ in range(5):
        sync(device)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 5:
            x @ w
            n += 1
        sync(device)
        best = max(best, n * flops / (time.perf_counter() - start))
    return best


def parameter_counts(model) -> dict:
    from peft_ft.engine.run import count_parameters

    trainable, total = count_parameters(model)
    return {"trainable": trainable, "total": total}


def model_dims(config, per_token_head: bool) -> dict:
    """The shape numbers of a BERT-family model that the FLOP count needs."""
    return {
        "hidden": config.hidden_size,
        "ffn": config.intermediate_size,
        "layers": config.num_hidden_layers,
        "labels": config.num_labels,
        "per_token_head": per_token_head,
    }


def train_flops(dims: dict, method: str, lengths: list[list[int]], r: int = LORA["r"]) -> float:
    """Model FLOPs of the training steps over these batches, counting real tokens only (padding
    is waste, so it lowers the share of the peak reached rather than adding to it).

    One multiply-add = 2 FLOPs. Per real token and layer, forward:
      linear layers  2 * (4 d^2 + 2 d f)            (query, key, value, attention output; the two FFN)
      attention      4 * d * n                       (QK^T and attention x V over the row's n real tokens)
      LoRA (r)       2 * r * (4*2d + 2*(d + f))      (A and B of the same six layers; LoRA only)
    Head: classifier d*C per token (NER); pooler + classifier (d^2 + d*C) once per row (classification).
    Backward: full fine-tuning 2x forward everywhere (gradients of inputs and of weights). LoRA: the
    frozen linear layers need input gradients only (1x their forward); attention, LoRA and the
    head 2x. So training = 3x forward for full, 2x frozen linears + 3x the rest for LoRA.
    Not counted: embeddings (lookups), softmax, LayerNorm, GELU, dropout (elementwise), LoRA on the
    pooler, and that layer 0 needs no input gradient under LoRA (a few % of the backward).
    """
    d, f, layers, c = dims["hidden"], dims["ffn"], dims["layers"], dims["labels"]
    tokens = sum(sum(b) for b in lengths)
    rows = sum(len(b) for b in lengths)
    squares = sum(n * n for b in lengths for n in b)
    linear = 2 * layers * (4 * d * d + 2 * d * f) * tokens
    attention = 4 * d * layers * squares
    lora = 2 * layers * r * (8 * d + 2 * (d + f)) * tokens if method == "lora" else 0
    head = 2 * d * c * tokens if dims["per_token_head"] else 2 * (d * d + d * c) * rows
    if method == "full":
        return 3 * (linear + attention + head)
    return 2 * linear + 3 * (attention + lora + head)


# --- the peft-ft side ----------------------------------------------------------------------------


def peft_ft_recipe(cfg: Config, opts: Options, max_steps: int, seed: int = SEED) -> str:
    """A peft-ft recipe (TOML) for one configuration: training split only, no evaluation."""
    adapter = f'method = "{cfg.method}"\n'
    if cfg.method == "lora":
        targets = ", ".join(f'"{t}"' for t in LORA["target_modules"])
        adapter += f"r = {LORA['r']}\nalpha = {LORA['alpha']}\ndropout = {opts.lora_dropout}\ntarget_modules = [{targets}]\n"
    return f"""
[model]
name = "{opts.model_dir}"
max_length = {opts.max_length}
{RECIPE_DATA[cfg.data].format(data_dir=opts.data_dir, max_train_samples=opts.max_train_samples).strip()}
[adapter]
{adapter}
[train]
epochs = 1000
max_steps = {max_steps}
batch_size = {opts.batch_size}
lr = {LR[cfg.method]}
group_by_length = {"false" if cfg.batching == "random" else "true"}
fast_kernels = {"false" if cfg.batching == "stock-layers" else "true"}
activation_checkpointing = {"true" if opts.activation_checkpointing else "false"}
mixed_precision = "{opts.mixed_precision}"
seed = {seed}
threads = {opts.threads}
device = "{opts.device}"
[eval]
predictions = false
"""


def run_peft_ft(cfg: Config, opts: Options, workdir: Path) -> Measured:
    """Set peft-ft up as `peft-ft run` does, then time its training loop (`peft_ft.engine.train.train`).

    The loop cannot leave steps out of its clock, so it is called twice on the same model: first
    `warmup` steps (untimed), then the timed steps with the next seed (fresh batches; the second
    call builds its own optimizer, whose state allocation then falls inside the timed steps)."""
    from peft_ft.data.batching import train_batches
    from peft_ft.engine.device import setup_torch as peft_ft_setup_torch
    from peft_ft.engine.run import build_model
    from peft_ft.engine.train import train
    from peft_ft.methods import METHODS
    from peft_ft.models.loading import resolve_model
    from peft_ft.recipe.load import load_recipe
    from peft_ft.tasks import TASKS

    def recipe(max_steps: int, seed: int):
        path = workdir / f"{cfg.data}_{cfg.method}_{seed}.toml"
        path.write_text(peft_ft_recipe(cfg, opts, max_steps, seed), encoding="utf-8")
        return load_recipe(path)

    warm = recipe(opts.warmup, SEED)
    task, method = TASKS[warm.task.type], METHODS[warm.adapter.method]
    data = task.load(warm, Path(opts.data_dir))
    device = peft_ft_setup_torch(warm)
    # The runner's own model builder: the adapter wrap plus the fast kernels, exactly as `peft-ft run`.
    model, tokenizer, _ = build_model(warm, task, method, resolve_model(warm), data, device)
    features = task.encode(data.splits["train"], tokenizer, warm, data)
    lengths = [f["length"] for f in features]
    pad_id = tokenizer.pad_token_id or 0
    common = {"lr": LR[cfg.method], "pad_id": pad_id, "device": device, "validate": None, "metric": ""}
    memory = PeakMemory(device).start()
    first = train(model, features, warm, **common)
    steps = capped_steps(opts, first.seconds / max(1, first.steps))
    timed = recipe(steps, SEED + 1)
    result = train(model, features, timed, **common)
    out = Measured(seconds=result.seconds, memory=memory.stop(),
                   dims=model_dims(model.config, per_token_head=task.peft_task_type == "TOKEN_CLS"))
    for batch in epoch_batches(train_batches, lengths, timed, result.steps):
        out.add_batch([lengths[i] for i in batch], max(lengths[i] for i in batch))
    out.params = parameter_counts(model)
    if out.tokens != result.tokens:  # our replay of the batch order must match what the loop saw
        raise RuntimeError(f"{cfg.label}: replayed {out.tokens} tokens, peft-ft counted {result.tokens}")
    return out


def epoch_batches(train_batches, lengths: list[int], recipe, steps: int) -> list[list[int]]:
    """The first `steps` batches peft-ft's loop draws (epoch after epoch), for the per-batch record."""
    t, batches, epoch = recipe.train, [], 0
    while len(batches) < steps:
        epoch += 1
        batches += train_batches(lengths, t.batch_size, group_by_length=t.group_by_length, seed=t.seed, epoch=epoch)
    return batches[:steps]


def capped_steps(opts: Options, seconds_per_step: float) -> int:
    """Timed steps: `opts.steps`, fewer when `max_seconds` would otherwise be overrun."""
    if not opts.max_seconds or seconds_per_step <= 0:
        return opts.steps
    return max(1, min(opts.steps, int(opts.max_seconds / seconds_per_step)))


# --- tables --------------------------------------------------------------------------------------


def show_table(title: str, columns: list[str], rows: list[list], notes: list[str], out: str | None = None) -> str:
    """Print a rich table (and its notes); return the markdown copy, also written to `out`."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < 4 else "right")
    for row in rows:
        table.add_row(*map(str, row))
    console = Console(width=None if sys.stdout.isatty() else 200)  # no wrapping in files and pipes
    console.print(table)
    for note in notes:
        console.print(note, markup=False, highlight=False)
    markdown = "\n".join([
        f"## {title}",
        "",
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" if i < 4 else "---:" for i in range(len(columns))) + " |",
        *("| " + " | ".join(map(str, row)) + " |" for row in rows),
        "",
        *(f"- {n}" for n in notes),
        "",
    ])
    if out:
        Path(out).write_text(markdown, encoding="utf-8")
        console.print(f"markdown copy: {out}", markup=False, highlight=False)
    return markdown


def machine_line(opts: Options) -> str:
    import platform

    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {opts.threads} torch thread(s), device {opts.device}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}; python {sys.version.split()[0]}")


# --- --smoke: a tiny BERT and tiny data in the real formats --------------------------------------

SMOKE_WORDS = ("the plant needs water and light to grow energy sun student answer reference because it is not "
               "john mary lives in paris london works at acme corp google said on monday").split()


def write_smoke_inputs(root: Path) -> tuple[str, str]:
    """A 2-layer hidden-32 BERT (512 positions, so padding to 512 works) with a word-level tokenizer,
    and 48-row SciEntsBank / CoNLL files in the real layouts; returns (model_dir, data_dir)."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from peft_ft.models.loading import quiet_transformers

    quiet_transformers()
    model_dir, data_dir = root / "tiny-bert", root / "data"
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SMOKE_WORDS, "-docstart-", "."]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(model_dir)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=PAD_TO)
    BertModel(config).save_pretrained(model_dir)

    rng = random.Random(0)
    text = lambda lo, hi: " ".join(rng.choice(SMOKE_WORDS[:17]) for _ in range(rng.randint(lo, hi)))
    (data_dir / "scientsbank").mkdir(parents=True)
    rows = [{"id": str(i), "question": text(3, 8), "reference_answer": text(3, 12), "student_answer": text(2, 30),
             "label": i % 5} for i in range(48)]
    pq.write_table(pa.Table.from_pylist(rows), data_dir / "scientsbank" / "train.parquet")
    (data_dir / "conll2003").mkdir()
    names = [[("john", "B-PER")], [("mary", "B-PER")], [("paris", "B-LOC")], [("london", "B-LOC")],
             [("acme", "B-ORG"), ("corp", "I-ORG")], [("google", "B-ORG")]]
    lines = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(48):
        for _ in range(rng.randint(2, 20)):
            words = rng.choice(names) if rng.random() < 0.3 else [(rng.choice(SMOKE_WORDS[:17]), "O")]
            lines += [f"{word} NN B-NP {tag}" for word, tag in words]
        lines.append("")
    (data_dir / "conll2003" / "train.txt").write_text("\n".join(lines), encoding="utf-8")
    return str(model_dir), str(data_dir)
