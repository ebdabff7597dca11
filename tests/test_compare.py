"""`peft-ft compare` on the tiny BERT: a comparison of lora and full through the CLI, resume after an
interruption, several seeds. Runs train in the test process (a subprocess spends ~10 s importing torch
on a busy machine); one test trains a variant in its own subprocess, as the CLI does."""

from __future__ import annotations

import csv
import json
import statistics
import struct

import pytest

from helpers import recipe_text, sentiment_rows, write_jsonl, write_recipe
from peft_ft.cli import main
from peft_ft.compare import report, runner
from peft_ft.compare.variants import ALL, MEASURE_FILE, budget_differences, build_variants, finished_run, parse_lrs, parse_methods
from peft_ft.errors import PeftFtError, RecipeError
from peft_ft.methods import METHODS
from peft_ft.recipe.load import load_recipe

RUN_NUMBERS = {  # comparison.csv column -> where the run folder says it
    "trainable_params": ("metrics.json", "params", "trainable_params"),
    "trainable_percent": ("metrics.json", "params", "trainable_percent"),
    "adapter_bytes": ("metrics.json", "params", "weight_bytes"),
    "train_seconds": ("metrics.json", "train", "seconds"),
    "train_samples_per_second": ("metrics.json", "train", "samples_per_second"),
    "peak_memory_mib": ("compare.json", "peak_memory_mib", None),
    "eval_latency_ms": ("compare.json", "eval_latency_ms", None),
}


def make_recipe(tmp, tiny_bert):
    data = tmp / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", sentiment_rows(24, seed=1))
    write_jsonl(data / "valid.jsonl", sentiment_rows(8, seed=2))
    write_jsonl(data / "test.jsonl", sentiment_rows(8, seed=3))
    write_jsonl(data / "test2.jsonl", sentiment_rows(6, seed=4))
    return write_recipe(tmp / "sent.toml", recipe_text(
        tiny_bert, data, model_opts={"max_length": 32}, task={"type": "classification"},
        data={"validation": "valid.jsonl", "test": ["test.jsonl", "test2.jsonl"]}, adapter={"method": "lora", "r": 4, "alpha": 8},
        train_opts={"lr": 1e-2}, output={"dir": tmp / "runs"}))


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def in_process(variant, recipe_file, isolate=True, resume=None, _real=runner.run_variant):
    return _real(variant, recipe_file, isolate=False, resume=resume)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_bert):
    """`peft-ft compare sent.toml --methods lora,full` through the CLI."""
    tmp = tmp_path_factory.mktemp("compare")
    recipe = make_recipe(tmp, tiny_bert)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "run_variant", in_process)
        assert main(["compare", str(recipe), "--methods", "lora,full"]) == 0
    return tmp / "runs" / "compare-sent"


def test_compare_writes_every_file(compared):
    assert {"comparison.md", "comparison.csv", "comparison.png", "runs.csv", "recipes", "lora-seed42", "full-seed42"} == {
        p.name for p in compared.iterdir()}
    assert {p.name for p in (compared / "recipes").iterdir()} == {"lora-seed42.toml", "full-seed42.toml"}
    for name in ("lora-seed42", "full-seed42"):
        (run_dir,) = (compared / name).iterdir()  # exactly one run folder per variant
        assert {"metrics.json", "peft_ft.json", "recipe.toml", MEASURE_FILE} <= {p.name for p in run_dir.iterdir()}
        assert read_json(run_dir / "peft_ft.json")["method"] == name.split("-")[0]


def test_table_rows_come_from_the_runs_own_files(compared):
    rows = read_csv(compared / "comparison.csv")
    assert [r["variant"] for r in rows] == ["lora", "full"]
    for row in rows:
        (run_dir,) = [compared / d for d in row["run_dirs"].split()]
        files = {"metrics.json": read_json(run_dir / "metrics.json"), "compare.json": read_json(run_dir / MEASURE_FILE)}
        for split in ("test", "test2"):
            for metric in ("accuracy", "macro_f1", "weighted_f1"):
                assert float(row[f"{split}/{metric}"]) == pytest.approx(files["metrics.json"][split][metric])
        assert "validation/accuracy" not in row  # test splits only: validation picked the epoch
        for column, (name, key, sub) in RUN_NUMBERS.items():
            expected = files[name][key] if sub is None else files[name][key][sub]
            assert float(row[column]) == pytest.approx(expected), column
            assert row[f"{column}_std"] == ""  # one seed: no spread
        assert float(row["eval_latency_ms"]) > 0 and float(row["peak_memory_mib"]) > 100  # torch alone takes more
        assert row["memory_kind"].startswith("peak RSS") and row["n_runs"] == "1"
    lora, full = rows
    assert int(full["trainable_params"]) > int(lora["trainable_params"]) and float(full["trainable_percent"]) == 100.0
    assert int(full["adapter_bytes"]) > int(lora["adapter_bytes"])


def test_each_method_keeps_its_own_learning_rate_and_keys(compared):
    rows = {r["variant"]: r for r in read_csv(compared / "comparison.csv")}
    assert float(rows["lora"]["lr"]) == 1e-2  # the recipe's, tuned for its own method
    assert float(rows["full"]["lr"]) == METHODS["full"].default_lr  # the recipe's rate is not for full
    full = load_recipe(compared / "recipes" / "full-seed42.toml")
    assert full.adapter.method == "full" and full.train.lr == 0.0 and "adapter.r" not in full.explicit
    assert load_recipe(compared / "recipes" / "lora-seed42.toml").adapter.r == 4


def test_markdown_and_console_table(compared, capsys):
    text = (compared / "comparison.md").read_text(encoding="utf-8")
    rows = read_csv(compared / "comparison.csv")
    table = [line for line in text.splitlines() if line.startswith("| lora ") or line.startswith("| full ")]
    assert len(table) == 2
    for line, row in zip(table, rows):
        assert f"{float(row['test/macro_f1']):.4f}" in line and f"{int(row['trainable_params']):,}" in line


def test_png_is_a_real_image(compared):
    data = (compared / "comparison.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 300 and len(data) > 10_000


def test_without_resume_an_existing_comparison_is_refused(compared):
    recipe = compared.parent.parent / "sent.toml"
    with pytest.raises(PeftFtError, match="--resume"):
        runner.compare([str(recipe)], ["lora", "full"])


def test_resume_after_an_interruption_skips_the_finished_runs(tmp_path, tiny_bert, monkeypatch):
    recipe = str(make_recipe(tmp_path, tiny_bert))
    trained, interrupt = [], [True]
    real_run_variant = runner.run_variant

    def interrupted_on_full(variant, recipe_file, isolate=True, resume=None):
        trained.append(variant.run_name)
        if variant.method == "full" and interrupt[0]:
            raise KeyboardInterrupt
        return real_run_variant(variant, recipe_file, isolate=False, resume=resume)

    monkeypatch.setattr(runner, "run_variant", interrupted_on_full)
    with pytest.raises(KeyboardInterrupt):
        runner.compare([recipe], ["lora", "full"])
    out = tmp_path / "runs" / "compare-sent"
    (lora_run,) = (out / "lora-seed42").iterdir()
    assert finished_run(out, "lora-seed42") == lora_run and not (out / "comparison.csv").exists()

    trained.clear()
    interrupt[0] = False
    runner.compare([recipe], ["lora", "full"], resume=True)
    assert trained == ["full-seed42"]  # lora was finished: skipped
    assert list((out / "lora-seed42").iterdir()) == [lora_run]
    rows = {r["variant"]: r for r in read_csv(out / "comparison.csv")}
    assert rows["lora"]["run_dirs"] == str(lora_run.relative_to(out)) and rows["full"]["n_runs"] == "1"

    # A finished run trained from a different recipe is not "the same command": refuse to mix them.
    with pytest.raises(PeftFtError, match="different recipe"):
        runner.compare([recipe], ["lora", "full"], overrides=["train.epochs=2"], resume=True)

    # The same folder spelled another way (relative here, absolute before) is the same comparison: nothing to train
    trained.clear()
    monkeypatch.chdir(tmp_path)
    runner.compare([recipe], ["lora", "full"], out="runs/compare-sent", resume=True)
    assert trained == []


def test_seeds_give_mean_and_std(tmp_path, tiny_bert):
    recipe = str(make_recipe(tmp_path, tiny_bert))
    out = runner.compare([recipe], ["lora"], seeds=2, lrs=["lora=5e-2"], isolate=False)
    (row,) = read_csv(out / "comparison.csv")
    runs = [finished_run(out, f"lora-seed{s}") for s in (42, 43)]
    assert row["seeds"] == "42 43" and row["n_runs"] == "2" and float(row["lr"]) == 5e-2
    assert [load_recipe(r / "recipe.toml").train.seed for r in runs] == [42, 43]
    losses = [read_json(r / "metrics.json")["train"]["history"][0]["train_loss"] for r in runs]
    assert losses[0] != losses[1]  # the seeds really differ
    for column in ("test/macro_f1", "train_seconds"):
        key = column.split("/")
        values = [read_json(r / "metrics.json")[key[0]][key[1]] if len(key) == 2
                  else read_json(r / "metrics.json")["train"]["seconds"] for r in runs]
        assert float(row[column]) == pytest.approx(statistics.fmean(values))
        std = statistics.stdev(values)
        assert (float(row[f"{column}_std"]) if row[f"{column}_std"] else 0.0) == pytest.approx(std)
    assert "±" in (out / "comparison.md").read_text(encoding="utf-8")
    assert len(read_csv(out / "runs.csv")) == 2


def test_variants_and_learning_rates_are_checked_before_training(tmp_path, tiny_bert):
    recipe = str(make_recipe(tmp_path, tiny_bert))
    variants = build_variants([recipe], ["full", "lora"], 1, {"full": 1e-3}, ["adapter.r=2"], tmp_path / "c", None)
    assert [(v.method, v.lr) for v in variants] == [("full", 1e-3), ("lora", 1e-2)]
    assert "r = 2" in variants[1].toml and "\nr = " not in variants[0].toml  # --set adapter.r only reaches lora
    with pytest.raises(RecipeError, match="ia3"):
        parse_lrs(["ia3=1e-3"], ["lora", "full"])
    with pytest.raises(RecipeError, match="--methods"):
        parse_methods("lora,nope")
    with pytest.raises(RecipeError, match="--methods: empty"):  # an unset shell variable, not the recipe's own
        parse_methods("")
    with pytest.raises(RecipeError) as info:  # each bad item named
        parse_methods("lora,,ful,lora")
    assert info.value.problems[:3] == ["an empty item; separate methods by single commas",
                                       "'ful' is no method (did you mean 'full'?)", "'lora' named twice"]
    assert main(["compare", recipe, "--methods", "lora", "--lr", "lora=fast"]) == 2
    assert main(["compare", recipe, "--methods", "lora", "--seeds", "1001"]) == 2
    assert main(["compare", recipe, "--methods", "lora", "--set", "train.seed=4294967295", "--seeds", "2"]) == 2
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_resume_continues_a_killed_variant_from_its_checkpoint(tmp_path, tiny_bert, monkeypatch):
    """A variant killed mid-run (SIGKILL after its first checkpoint) is continued by `--resume` in its own folder,
    not trained again from the start in a new one."""
    from helpers import run_killed

    recipe = str(make_recipe(tmp_path, tiny_bert))
    settings = ["train.batch_size=4", "train.checkpoint_every=2", "train.epochs=2"]

    def killed(variant, recipe_file, isolate=True, resume=None):
        return run_killed(recipe_file, after=1, cwd=tmp_path).returncode

    monkeypatch.setattr(runner, "run_variant", killed)
    with pytest.raises(PeftFtError, match="1 run\\(s\\) failed: lora-seed42"):
        runner.compare([recipe], ["lora"], overrides=settings)
    out = tmp_path / "runs" / "compare-sent"
    (stopped,) = (out / "lora-seed42").iterdir()
    assert not (stopped / "metrics.json").exists() and (stopped / "checkpoints").is_dir()

    monkeypatch.setattr(runner, "run_variant", in_process)
    runner.compare([recipe], ["lora"], overrides=settings, resume=True)
    assert list((out / "lora-seed42").iterdir()) == [stopped] and finished_run(out, "lora-seed42") == stopped
    assert "resumed from" in (stopped / "train.log").read_text()
    assert read_json(stopped / "metrics.json")["train"]["steps"] == 12  # 2 epochs x 24 rows / 4


def test_resume_measures_a_variant_finished_by_hand_rather_than_training_it_again(tmp_path, tiny_bert, monkeypatch):
    """A stopped variant's message says `peft-ft run --resume RUN_DIR`; a user who did that has a finished run
    without compare's measurements: `compare --resume` measures it in its folder, no second training."""
    from helpers import run_killed

    recipe = str(make_recipe(tmp_path, tiny_bert))
    settings = ["train.batch_size=4", "train.checkpoint_every=2"]
    monkeypatch.setattr(runner, "run_variant", lambda v, f, isolate=True, resume=None: run_killed(f, after=1, cwd=tmp_path).returncode)
    with pytest.raises(PeftFtError, match="1 run\\(s\\) failed: lora-seed42"):
        runner.compare([recipe], ["lora"], overrides=settings)
    out = tmp_path / "runs" / "compare-sent"
    (stopped,) = (out / "lora-seed42").iterdir()
    assert main(["run", "--resume", str(stopped)]) == 0
    trained = (stopped / "metrics.json").read_bytes()

    monkeypatch.setattr(runner, "run_variant", in_process)
    runner.compare([recipe], ["lora"], overrides=settings, resume=True)
    assert list((out / "lora-seed42").iterdir()) == [stopped] and finished_run(out, "lora-seed42") == stopped
    assert (stopped / "metrics.json").read_bytes() == trained  # measured, not trained again
    measured = read_json(stopped / "compare.json")
    assert measured["peak_memory_mib"] == read_json(stopped / "metrics.json")["train"]["peak_rss_mib"] > 0
    assert read_csv(out / "comparison.csv")[0]["n_runs"] == "1"


def test_a_variant_refused_before_training_is_not_started_again_for_each_seed(tmp_path, tiny_bert, monkeypatch):
    recipe = str(make_recipe(tmp_path, tiny_bert))
    started = []

    def refuse_full(variant, recipe_file, isolate=True, resume=None):
        started.append(variant.run_name)
        return 2 if variant.method == "full" else in_process(variant, recipe_file)

    monkeypatch.setattr(runner, "run_variant", refuse_full)
    with pytest.raises(PeftFtError, match="3 run\\(s\\) failed: full-seed42, full-seed43, full-seed44"):
        runner.compare([recipe], ["full", "lora"], seeds=3)
    assert started == ["full-seed42", "lora-seed42", "lora-seed43", "lora-seed44"]


def test_ctrl_c_in_a_terminal_stops_the_variant_with_a_checkpoint_and_no_traceback(tmp_path, tiny_bert):
    """Ctrl-C reaches the whole foreground process group: compare and its variant's process. The variant stops after
    its step with a checkpoint (compare waits for it), both exit without a traceback, compare with 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = str(make_recipe(tmp_path, tiny_bert))
    out = tmp_path / "c"
    process = subprocess.Popen(
        [sys.executable, "-m", "peft_ft", "compare", recipe, "--methods", "lora", "--out", str(out),
         "--set", "train.epochs=500", "--set", "train.batch_size=4", "--set", "train.checkpoint_every=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # a shell started in the background (CI) ignores SIGINT, and children inherit that: give it back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(out.glob("lora-seed42/*/checkpoints/step-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    said = " ".join((stdout + stderr).split())  # the console wraps long lines
    assert "Traceback" not in said and "the same command with --resume to go on" in said, said[-3000:]
    (stopped,) = (out / "lora-seed42").iterdir()
    assert not (stopped / "metrics.json").exists() and list((stopped / "checkpoints").glob("step-*"))
    assert "interrupted (SIGINT): checkpoint" in (stopped / "train.log").read_text()


def test_a_set_key_of_another_compared_method_reaches_that_method_only(tmp_path, tiny_bert):
    """A LoRA recipe compared with prompt tuning: `--set adapter.num_virtual_tokens=4` is prompt tuning's key
    (validated on the LoRA recipe alone, it was refused)."""
    recipe = str(make_recipe(tmp_path, tiny_bert))
    variants = build_variants([recipe], ["lora", "prompt_tuning"], 1, {}, ["adapter.num_virtual_tokens=4"], tmp_path / "c", None)
    toml = {v.method: v.toml for v in variants}
    assert "num_virtual_tokens = 4" in toml["prompt_tuning"] and "num_virtual_tokens" not in toml["lora"]
    with pytest.raises(RecipeError, match=r"--set adapter.num_virtual_tokens=4: applies only when adapter.method is .*"
                                          r"none of the compared methods \(lora, full\) uses it"):
        build_variants([recipe], ["lora", "full"], 1, {}, ["adapter.num_virtual_tokens=4"], tmp_path / "c", None)


def test_a_device_this_machine_lacks_is_refused_once_before_any_run(tmp_path, tiny_bert, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    recipe = str(make_recipe(tmp_path, tiny_bert))
    assert main(["compare", recipe, "--methods", "lora,full", "--set", "train.device=cuda", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("torch sees no CUDA GPU") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()


def test_a_variant_trains_in_a_process_of_its_own(tmp_path, tiny_bert):
    """What the CLI does for every variant: `python -m peft_ft.compare.child VARIANT.toml` in a subprocess."""
    recipe = str(make_recipe(tmp_path, tiny_bert))
    (variant,) = build_variants([recipe], ["lora"], 1, {}, [], tmp_path / "c", None)
    (tmp_path / "c").mkdir()
    write_recipe(tmp_path / "c" / "lora.toml", variant.toml)
    assert runner.run_variant(variant, tmp_path / "c" / "lora.toml") == 0
    run_dir = finished_run(tmp_path / "c", "lora-seed42")
    measured = read_json(run_dir / MEASURE_FILE)
    assert measured["memory_kind"] == "peak RSS"  # the child's own peak, not this test process's
    assert measured["peak_memory_mib"] == read_json(run_dir / "metrics.json")["train"]["peak_rss_mib"]
    assert measured["latency_split"] == "test" and measured["latency_examples"] == 8 and measured["eval_latency_ms"] > 0


def test_several_recipes_are_labelled_by_file(tmp_path, tiny_bert):
    first = make_recipe(tmp_path, tiny_bert)
    second = write_recipe(tmp_path / "longer.toml", first.read_text().replace("epochs = 1", "epochs = 2"))
    variants = build_variants([str(first), str(second)], ["lora", "full"], 1, {}, [], tmp_path / "c", None)
    assert [v.run_name for v in variants] == ["sent-lora-seed42", "sent-full-seed42", "longer-lora-seed42", "longer-full-seed42"]
    assert budget_differences([str(first), str(second)], []) == ["train.epochs"]


def test_a_failed_variant_is_reported_and_the_others_tabulated(tmp_path, tiny_bert, monkeypatch):
    recipe = str(make_recipe(tmp_path, tiny_bert))
    monkeypatch.setattr(runner, "run_variant", lambda v, f, isolate=True, resume=None: 2 if v.method == "full" else in_process(v, f))
    with pytest.raises(PeftFtError, match="1 run\\(s\\) failed: full-seed42"):
        runner.compare([recipe], ["lora", "full"])
    rows = {r["variant"]: r for r in read_csv(tmp_path / "runs" / "compare-sent" / "comparison.csv")}
    assert rows["lora"]["n_runs"] == "1" and float(rows["lora"]["test/accuracy"]) >= 0
    assert rows["full"]["n_runs"] == "0" and rows["full"]["failed"] == "1"
    assert (tmp_path / "runs" / "compare-sent" / "comparison.png").stat().st_size > 0


def test_plot_draws_every_test_split_on_an_axis_from_zero(compared, monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.aggregate([], compared)  # (no variants: an empty plot still writes)
    report.plot_comparison(rows, tmp_path / "empty.png")
    rows = [r for r in read_csv(compared / "comparison.csv")]
    assert report.plotted_metrics([{**r, "n_runs": 1} for r in rows]) == ["test/macro_f1", "test2/macro_f1"]
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    typed = [{k: (float(v) if k.endswith(("macro_f1", "_params", "seconds")) and v else v) for k, v in r.items()} | {"n_runs": 1}
             for r in rows]
    report.plot_comparison(typed, tmp_path / "plot.png")
    bars, by_params, by_time = figures[0].axes
    assert bars.get_ylim()[0] == 0.0 and by_params.get_ylim()[0] == 0.0 and by_time.get_ylim()[0] == 0.0
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["test", "test2"]
    assert len(bars.patches) == 2 * len(rows)  # one bar per split and variant


def test_methods_all_picks_what_fits_the_task_and_model(tmp_path, tiny_bert, caplog):
    import logging

    recipe = str(make_recipe(tmp_path, tiny_bert))
    assert parse_methods("all") == [ALL]
    with caplog.at_level(logging.INFO, logger="peft_ft"):
        variants = build_variants([recipe], [ALL], 1, {}, [], tmp_path / "c", None)
    chosen = [v.method for v in variants]
    expected = [m for m in METHODS if m != "prefix_tuning" or "prefix_tuning left out" not in caplog.text]
    assert chosen == expected and {"lora", "full", "adalora", "vera", "p_tuning", "fourierft", "vblora"} <= set(chosen)
    # a recipe whose inputs leave no room for virtual tokens: the prompt methods are left out, with the reason
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="peft_ft"):
        variants = build_variants([recipe], [ALL], 1, {}, ["model.max_length=500"], tmp_path / "c", None)
    assert not {"prompt_tuning", "p_tuning"} & {v.method for v in variants}
    assert "p_tuning left out: model.max_length (500) + adapter.num_virtual_tokens (20) exceeds the 512 positions" in caplog.text


def test_resume_refuses_a_folder_of_another_comparison(compared, tmp_path):
    """--resume into a folder that is no comparison (a sweep's), or that compares variants this command does not
    plan, is refused before anything is written: its tables would otherwise lose the rows of its finished variants."""
    recipe = str(compared.parent.parent / "sent.toml")
    tables = {name: (compared / name).read_bytes() for name in ("comparison.csv", "comparison.md", "runs.csv")}
    sweep_folder = tmp_path / "sw"
    (sweep_folder / "trials").mkdir(parents=True)
    (sweep_folder / "sweep.json").write_text("{}")
    with pytest.raises(PeftFtError, match="holds no comparison \\(no recipes/ folder"):
        runner.compare([recipe], ["lora"], out=str(sweep_folder), resume=True)
    assert sorted(p.name for p in sweep_folder.iterdir()) == ["sweep.json", "trials"]
    with pytest.raises(PeftFtError, match="compares variants this command does not plan \\(full-seed42\\); resume with"):
        runner.compare([recipe], ["lora"], out=str(compared), resume=True)
    with pytest.raises(PeftFtError, match="lora-seed42 was planned from a different recipe than it now resolves to"):
        runner.compare([recipe], ["lora", "full"], lrs=["lora=3e-2"], out=str(compared), resume=True)
    assert {name: (compared / name).read_bytes() for name in tables} == tables


def test_resume_refuses_finished_runs_of_another_data_folder(compared, tmp_path):
    """Seeds trained on other data would be averaged into one mean ± std."""
    import shutil

    recipe = str(compared.parent.parent / "sent.toml")
    other = tmp_path / "other-data"
    shutil.copytree(compared.parent.parent / "data", other)
    before = (compared / "comparison.csv").read_bytes()
    with pytest.raises(PeftFtError, match=f"was trained on the data in {compared.parent.parent / 'data'}, not {other}; "
                                          f"resume with --data-dir"):
        runner.compare([recipe], ["lora", "full"], out=str(compared), resume=True, data_dir=str(other))
    assert (compared / "comparison.csv").read_bytes() == before


def test_a_method_given_two_learning_rates_is_refused():
    with pytest.raises(RecipeError, match="'lora=2e-3': two values for lora \\(0.001 and 0.002\\)"):
        parse_lrs(["lora=1e-3", "lora=2e-3"], ["lora", "full"])
    for value in ("nan", "inf", "-1", "fast"):  # nan and inf were taken, and refused later as the recipe's train.lr
        with pytest.raises(RecipeError, match=f"--lr: 'lora={value}': expected METHOD=LEARNING_RATE with a positive number"):
            parse_lrs([f"lora={value}"], ["lora"])


def test_set_output_is_refused(tmp_path, tiny_bert, capsys):
    """compare names and places every variant's run folder itself: `--set output.name=...` would change nothing."""
    recipe = str(make_recipe(tmp_path, tiny_bert))
    assert main(["compare", recipe, "--methods", "lora", "--set", "output.name=foo", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--set output.name=foo: compare names and places each variant's run folder itself" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("damaged, content, message", [
    ("lora-seed42/*/recipe.toml", b"\xff\xfe not utf-8", r"recipe.toml: unreadable .*; remove .*lora-seed42/.* to train that run again"),
    ("recipes/full-seed42.toml", b"[train\n", r"full-seed42.toml: unreadable .*; remove it \(compare writes it again before training\)"),
    ("lora-seed42/*/compare.json", b"{", r"compare.json: unreadable .*; the folder is damaged or was edited"),
    ("full-seed42/*/metrics.json", b"[1]", r"metrics.json: expected a JSON object, got list"),
    ("lora-seed42/*/peft_ft.json", b"{", r"peft_ft.json: unreadable"),
])
def test_resume_names_a_damaged_file_of_the_comparison(compared, tmp_path, damaged, content, message, monkeypatch):
    """Each was a traceback (UnicodeDecodeError, JSONDecodeError, TypeError); the files are left as they were."""
    import shutil

    copy = shutil.copytree(compared, tmp_path / "copy")
    [path] = copy.glob(damaged)
    path.write_bytes(content)
    monkeypatch.setattr(runner, "run_variant", lambda *a, **k: pytest.fail("trained a variant"))
    with pytest.raises(PeftFtError, match=message):
        runner.compare([str(compared.parent.parent / "sent.toml")], ["lora", "full"], out=str(copy), resume=True)
    assert path.read_bytes() == content
