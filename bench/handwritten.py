"""The baseline: what a user writes instead of peft-ft.

A plain `transformers.Trainer` + `peft` script, the way the transformers examples do it: a
`datasets.Dataset` tokenized with `.map`, dynamic padding by `DataCollatorWithPadding` /
`DataCollatorForTokenClassification`, random order or `train_sampling_strategy="group_by_length"`;
and the seeds' approach, every row padded to 512 tokens when tokenized. Only a callback (the clock)
and a `training_step` that notes each batch's real lengths are added for the measurement.

Run one configuration on its own:
    python bench/handwritten.py --data scientsbank --method lora --batching grouped --steps 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import (
    LORA,
    LR,
    PAD_TO,
    SEED,
    Config,
    Measured,
    Options,
    PeakMemory,
    add_option_arguments,
    model_dims,
    model_root,
    options_from,
    parameter_counts,
    run_main,
    setup_torch,
    sync,
    write_smoke_inputs,
)


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """Sentences of a CoNLL-2003 file as (tokens, tags): token first, tag last, blank lines between
    sentences, -DOCSTART- lines dropped."""
    sentences, tokens, tags = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if tokens:
                sentences.append((tokens, tags))
            tokens, tags = [], []
            continue
        tokens.append(parts[0])
        tags.append(parts[-1])
    if tokens:
        sentences.append((tokens, tags))
    return sentences


def scientsbank_dataset(data_dir: str, tokenizer, pad512: bool, opts: Options):
    """(tokenized dataset, label count): reference answer + student answer -> one of 5 grades."""
    import datasets
    import pandas as pd

    frame = pd.read_parquet(Path(data_dir) / "scientsbank" / "train.parquet")
    if opts.max_train_samples:
        frame = frame.iloc[: opts.max_train_samples]
    ds = datasets.Dataset.from_pandas(frame, preserve_index=False)
    padding = {"padding": "max_length", "max_length": PAD_TO} if pad512 else {"max_length": opts.max_length}

    def tokenize(batch):
        return tokenizer(batch["reference_answer"], batch["student_answer"], truncation=True, **padding)

    ds = ds.map(tokenize, batched=True, remove_columns=["id", "question", "reference_answer", "student_answer"])
    return ds, 5


def conll_dataset(data_dir: str, tokenizer, pad512: bool, opts: Options):
    """(tokenized dataset, tag count); labels on each word's first subword, -100 elsewhere (run_ner.py's way)."""
    import datasets

    sentences = read_conll(Path(data_dir) / "conll2003" / "train.txt")
    if opts.max_train_samples:
        sentences = sentences[: opts.max_train_samples]
    names = sorted({t for _, tags in sentences for t in tags})
    ds = datasets.Dataset.from_dict({"tokens": [s[0] for s in sentences], "tags": [[names.index(t) for t in s[1]] for s in sentences]})
    padding = {"padding": "max_length", "max_length": PAD_TO} if pad512 else {"max_length": opts.max_length}

    def tokenize(batch):
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, **padding)
        enc["labels"] = []
        for i, tags in enumerate(batch["tags"]):
            previous, labels = None, []
            for word in enc.word_ids(i):
                labels.append(-100 if word is None or word == previous else tags[word])
                previous = word
            enc["labels"].append(labels)
        return enc

    return ds.map(tokenize, batched=True, remove_columns=["tokens", "tags"]), len(names)


def build_model(model_dir: str, ner: bool, num_labels: int, method: str, lora_dropout: float = LORA["dropout"]):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    cls = AutoModelForTokenClassification if ner else AutoModelForSequenceClassification
    model = cls.from_pretrained(model_dir, num_labels=num_labels, dtype=torch.float32)
    if method == "full":
        return model
    config = LoraConfig(task_type="TOKEN_CLS" if ner else "SEQ_CLS", r=LORA["r"], lora_alpha=LORA["alpha"],
                        lora_dropout=lora_dropout, target_modules=list(LORA["target_modules"]))
    return get_peft_model(model, config)


def run_trainer(cfg: Config, opts: Options, workdir: Path) -> Measured:
    """Train one configuration with the Trainer; the steps after `opts.warmup` are timed."""
    import datasets
    import transformers
    from transformers import (
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    device = setup_torch(opts)
    ner, pad512 = cfg.data == "conll", cfg.batching == "pad512"
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_root(opts))
    ds, num_labels = (conll_dataset if ner else scientsbank_dataset)(opts.data_dir, tokenizer, pad512, opts)
    model = build_model(model_root(opts), ner, num_labels, cfg.method, opts.lora_dropout)
    if pad512:
        collator = default_data_collator  # already padded when tokenized
    else:
        collator = (DataCollatorForTokenClassification if ner else DataCollatorWithPadding)(tokenizer)

    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        per_device_train_batch_size=opts.batch_size,
        max_steps=opts.warmup + opts.steps,
        learning_rate=LR[cfg.method],
        warmup_steps=0.06,
        train_sampling_strategy="group_by_length" if cfg.batching == "grouped" else "random",
        use_cpu=opts.device == "cpu",
        bf16=opts.mixed_precision == "bf16",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
        activation_checkpointing=opts.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
    )
    measured = Measured()
    clock = step_clock(opts, device)

    class TimedTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step >= opts.warmup:  # this batch belongs to a timed step
                mask = inputs["attention_mask"]
                measured.add_batch(mask.sum(dim=1).tolist(), mask.shape[1])
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = TimedTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                           processing_class=tokenizer, callbacks=[clock])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # it prints the final metrics dict
    memory = PeakMemory(device).start()
    trainer.train()
    measured.memory = memory.stop()
    measured.lengths = measured.lengths[: clock.steps]  # a batch drawn after a stop is not a timed step
    measured.widths = measured.widths[: clock.steps]
    measured.seconds = clock.seconds
    measured.dims = model_dims(model.config, per_token_head=ner)
    measured.params = parameter_counts(model)
    return measured


def step_clock(opts: Options, device):
    """A Trainer callback that starts at the end of the last warm-up step, stops at the end of each
    later one, and asks the Trainer to stop once `max_seconds` have passed."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        start = end = 0.0
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            now = time.perf_counter()
            if state.global_step == opts.warmup:
                self.start = now
            elif state.global_step > opts.warmup:
                self.end, self.steps = now, state.global_step - opts.warmup
                if opts.max_seconds and self.end - self.start >= opts.max_seconds:
                    control.should_training_stop = True

        @property
        def seconds(self) -> float:
            return self.end - self.start

    return StepClock()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["scientsbank", "conll"], default="scientsbank")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--batching", choices=["grouped", "random", "pad512"], default="grouped")
    parser.add_argument("--smoke", action="store_true", help="tiny BERT and tiny data built in code, a few steps")
    add_option_arguments(parser, steps=8, warmup=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.model, args.data_dir = write_smoke_inputs(Path(tmp))
            args.steps, args.warmup, args.batch_size = min(args.steps, 2), 1, 8
        opts = options_from(args, [args.data])
        cfg = Config(args.data, "trainer", args.method, args.batching)
        m = run_trainer(cfg, opts, Path(tmp))
    print(json.dumps({
        "config": cfg.label, "steps": m.steps, "seconds": round(m.seconds, 3),
        "samples_per_second": round(m.samples / m.seconds, 2), "tokens_per_second": round(m.tokens / m.seconds, 1),
        "real_share": round(m.tokens / m.computed_tokens, 3), "memory": m.memory,
    }))


if __name__ == "__main__":
    run_main(main)
