"""`peft-ft sweep` on the tiny BERT: a 4-trial sweep with SQLite, pruning, --resume, two worker
processes on one study (SQLite and a real PostgreSQL started in a temporary folder), and the best
recipe reproducing its trial. Trials of one worker train in the test process (no second torch import)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import recipe_text, sentiment_rows, write_jsonl, write_recipe
from peft_ft.cli import main
from peft_ft.errors import PeftFtError
from peft_ft.recipe.load import load_recipe
from peft_ft.sweep.space import SpaceError
from peft_ft.sweep.study import open_study, storage_url, sweep


@pytest.fixture
def recipe(tmp_path, tiny_bert):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", sentiment_rows(32, seed=1))
    write_jsonl(data / "valid.jsonl", sentiment_rows(12, seed=2))
    write_jsonl(data / "test.jsonl", sentiment_rows(8, seed=3))

    def make(epochs: int = 1) -> Path:
        return write_recipe(tmp_path / "sent.toml", recipe_text(
            tiny_bert, data, model_opts={"max_length": 32}, task={"type": "classification"},
            data={"validation": "valid.jsonl", "test": ["test.jsonl"]}, adapter={"method": "lora", "r": 4, "alpha": 8},
            train_opts={"epochs": epochs, "lr": 1e-2}, output={"dir": tmp_path / "runs"}))

    return make


def space_file(tmp_path, text: str) -> Path:
    return write_recipe(tmp_path / "space.toml", text)


def trials_csv(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "trials.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def finished(sweep_dir: Path):
    from peft_ft.sweep.study import Plan

    plan = Plan.read(sweep_dir)
    return open_study(storage_url(sweep_dir, None), plan.study)


LR_AND_RANK = """
[train]
lr = {low = 1e-3, high = 5e-2, log = true}
[adapter]
r = [2, 4, 8]
[sweep]
startup_trials = 2
pruner = "none"
"""


def test_four_trials_sqlite_reports_and_best_recipe(tmp_path, recipe):
    """Four trials through the CLI: four run folders, the tables, the plot, the importance ranking, and a
    best recipe that validates and, trained again, gives the best trial's validation value."""
    sweep_dir = tmp_path / "sw"
    assert main([ "sweep", str(recipe()), "--space", str(space_file(tmp_path, LR_AND_RANK)), "--trials", "4",
                  "--out", str(sweep_dir)]) == 0
    study = finished(sweep_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert (sweep_dir / "study.db").is_file()
    for t in study.trials:
        run_dir = sweep_dir / t.user_attrs["run_dir"]  # relative to the sweep folder: it travels with it
        assert run_dir.parent.parent == sweep_dir / "trials" and run_dir.parent.name == f"trial-{t.number:04d}"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["train"]["best_value"] == t.value == metrics["validation"]["macro_f1"]
        assert "test" not in metrics  # a sweep never looks at test splits
        resolved = load_recipe(run_dir / "recipe.toml")
        assert resolved.train.lr == pytest.approx(t.params["train.lr"]) and resolved.adapter.r == t.params["adapter.r"]
        assert 1e-3 <= t.params["train.lr"] <= 5e-2 and t.params["adapter.r"] in (2, 4, 8)
    rows = trials_csv(sweep_dir)
    assert sorted(int(r["trial"]) for r in rows) == [0, 1, 2, 3]
    assert float(rows[0]["value"]) == study.best_value
    assert any(r["front_trainable_params"] == "True" for r in rows)
    md = (sweep_dir / "sweep.md").read_text()
    assert "## Parameter importance (Optuna)" in md
    values = {t.value for t in study.trials}  # the tiny model may learn nothing in one epoch: then no ranking
    assert ("| train.lr |" in md and "| adapter.r |" in md) if len(values) > 1 else "every finished trial has the same value" in md
    assert (sweep_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best_file = sweep_dir / "best.toml"
    assert main(["validate", str(best_file)]) == 0
    best = load_recipe(best_file)
    assert best.train.lr == pytest.approx(study.best_params["train.lr"]) and best.adapter.r == study.best_params["adapter.r"]
    assert best.data.test == ["test.jsonl"] and best.output.dir == str(tmp_path / "runs")
    from peft_ft.engine.run import run

    again_dir = run(best)
    again = json.loads((again_dir / "metrics.json").read_text())
    assert again["validation"]["macro_f1"] == pytest.approx(study.best_value, abs=1e-9)
    assert "test" in again
    # Same training, not just the same score: every validation probability matches the best trial's.
    trial_dir = sweep_dir / study.best_trial.user_attrs["run_dir"]
    probs = [[json.loads(line)["probabilities"] for line in (d / "predictions_validation.jsonl").read_text().splitlines()]
             for d in (trial_dir, again_dir)]
    assert probs[0] == probs[1]


def test_pruning_stops_the_trial_with_the_worst_first_epoch(tmp_path, recipe, monkeypatch):
    """Two trials, then one whose first-epoch validation value is below theirs: it stops after epoch 1.
    Every trial really trains; its validation macro-F1 is set per seed (what a tiny model learns in an
    epoch moves with any library or numerics change, the pruner's decision must not)."""
    import peft_ft.engine.run
    import peft_ft.engine.train

    curves = {2: [0.5, 0.7, 0.8], 3: [0.45, 0.6, 0.75], 4: [0.1, 0.9, 0.95]}
    real_train = peft_ft.engine.train.train

    def train_with_set_scores(model, features, recipe, *, validate, **kwargs):
        def scores(epoch):
            return {**validate(epoch), "macro_f1": curves[recipe.train.seed][epoch - 1]}
        return real_train(model, features, recipe, validate=scores, **kwargs)

    monkeypatch.setattr(peft_ft.engine.run, "train", train_with_set_scores)  # the loop as the runner calls it
    recipe_file = recipe(epochs=3)
    text = """
[train]
seed = [2, 3, 4]
[sweep]
pruner_startup_trials = 2
enqueue = [{"train.seed" = 2}, {"train.seed" = 3}, {"train.seed" = 4}]
"""
    sweep_dir = sweep(str(recipe_file), str(space_file(tmp_path, text)), trials=3, out=str(tmp_path / "sw"))
    trials = finished(sweep_dir).trials
    assert [t.params["train.seed"] for t in trials] == [2, 3, 4]
    assert [dict(t.intermediate_values) for t in trials] == [dict(zip((1, 2, 3), curves[2])), dict(zip((1, 2, 3), curves[3])), {1: 0.1}]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    for t in trials[:2]:  # what the loop reported is what the run folder recorded
        history = json.loads((sweep_dir / t.user_attrs["run_dir"] / "metrics.json").read_text())["train"]["history"]
        assert [h["validation_macro_f1"] for h in history] == [t.intermediate_values[e] for e in (1, 2, 3)]
    pruned_dir = sweep_dir / trials[2].user_attrs["run_dir"]
    assert not (pruned_dir / "metrics.json").exists() and not (pruned_dir / "checkpoints").exists()
    log = (pruned_dir / "train.log").read_text()
    assert "epoch 1:" in log and "epoch 2:" not in log
    assert [r["state"] for r in trials_csv(sweep_dir)] == ["complete", "complete", "pruned"]


def test_resume_continues_the_same_study(tmp_path, recipe):
    space = space_file(tmp_path, LR_AND_RANK)
    sweep_dir = sweep(str(recipe()), str(space), trials=2, out=str(tmp_path / "sw"))
    first = [(t.number, t.params, t.value) for t in finished(sweep_dir).trials]
    study_id = finished(sweep_dir)._study_id
    with pytest.raises(Exception, match="already holds a sweep; pass --resume"):
        sweep(str(recipe()), str(space), trials=3, out=str(sweep_dir))
    sweep(str(recipe()), str(space), trials=3, out=str(sweep_dir), resume=True)
    study = finished(sweep_dir)
    assert study._study_id == study_id and len(study.trials) == 3
    assert [(t.number, t.params, t.value) for t in study.trials[:2]] == first
    assert study.trials[2].params != first[0][1] and study.trials[2].params != first[1][1]  # a fresh seed, not a replay
    assert len(list((sweep_dir / "trials").iterdir())) == 3
    other = write_recipe(tmp_path / "other.toml", "[train]\nlr = [1e-2, 2e-2]\n")
    assert main(["sweep", str(recipe()), "--space", str(other), "--out", str(sweep_dir), "--resume"]) == 2  # not mixed in
    # another study name, or another storage, would start an empty study and report it as this sweep
    with pytest.raises(Exception, match="holds the study 'sent', not 'other'; leave --study out"):
        sweep(str(recipe()), str(space), out=str(sweep_dir), resume=True, study="other")
    with pytest.raises(Exception, match="study is stored in sqlite:///.*study.db, not sqlite:///.*elsewhere.db; pass the same --storage"):
        sweep(str(recipe()), str(space), out=str(sweep_dir), resume=True, storage=f"sqlite:///{tmp_path / 'elsewhere.db'}")
    other_db = tmp_path / "elsewhere" / "study.db"  # named like the default, but another sweep's file
    with pytest.raises(Exception, match="pass the same --storage"):
        sweep(str(recipe()), str(space), out=str(sweep_dir), resume=True, storage=f"sqlite:///{other_db}")
    assert len(finished(sweep_dir).trials) == 3 and not (tmp_path / "elsewhere.db").exists() and not other_db.exists()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks for trials by hand
def test_resume_runs_stopped_trials_again(tmp_path, recipe):
    """A trial stopped by Ctrl-C, and one left running by a worker of this machine that is gone, run again
    with their own values on --resume; they do not count towards --trials, their reruns do."""
    from optuna.trial import TrialState

    from peft_ft.sweep.study import load_parts

    space_path = space_file(tmp_path, LR_AND_RANK)
    sweep_dir = sweep(str(recipe()), str(space_path), trials=1, out=str(tmp_path / "sw"))
    _, base, space = load_parts(str(recipe()), str(space_path), [])
    study = finished(sweep_dir)
    gone = subprocess.Popen(["true"])
    gone.wait()
    stopped = {}
    for how in ("interrupted", "dead worker"):
        trial = study.ask()
        stopped[how] = space.sample(trial, base)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", gone.pid)
        if how == "interrupted":
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
    sweep(str(recipe()), str(space_path), trials=3, out=str(sweep_dir), resume=True)
    trials = finished(sweep_dir).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    reruns = {t.system_attrs["failed_trial"]: t.params for t in trials[3:]}
    assert reruns == {1: stopped["interrupted"], 2: stopped["dead worker"]}
    assert [r["state"] for r in trials_csv(sweep_dir)].count("complete") == 3


def _two_workers(tmp_path, recipe, storage: str | None) -> list:
    space = space_file(tmp_path, LR_AND_RANK)
    args = ["sweep", str(recipe()), "--space", str(space), "--trials", "4", "--workers", "2", "--out", str(tmp_path / "sw")]
    assert main(args + (["--storage", storage] if storage else [])) == 0
    study = open_study(storage or storage_url(tmp_path / "sw", None), "sent")
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers took trials
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == 4 and all((tmp_path / "sw" / d / "metrics.json").is_file() for d in run_dirs)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4  # no trial drawn twice
    return trials


def test_two_workers_share_one_sqlite_study(tmp_path, recipe):
    _two_workers(tmp_path, recipe, None)


def _postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin (Debian)."""
    on_path = [shutil.which(name) for name in ("initdb", "pg_ctl")]
    if all(on_path) and Path(on_path[0]).parent == Path(on_path[1]).parent:
        return Path(on_path[0]).parent
    found = [d for d in sorted(Path("/usr/lib/postgresql").glob("*/bin")) if (d / "initdb").is_file() and (d / "pg_ctl").is_file()]
    return found[-1] if found else None


@pytest.fixture
def postgres():
    """A PostgreSQL server in a temporary folder, on a free local port, for this test only. As root the
    server runs as `nobody` (PostgreSQL refuses to run as root)."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl not found (PATH, /usr/lib/postgresql/*/bin)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg not installed (pip install 'peft-ft[postgres]')")
    folder = Path(tempfile.mkdtemp(prefix="peft-ft-pg-"))
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        try:
            shutil.chown(folder, "nobody")
        except (LookupError, PermissionError) as e:
            shutil.rmtree(folder, ignore_errors=True)
            pytest.skip(f"running as root and cannot hand a folder to the user nobody ({e}): PostgreSQL refuses to run as root")
        prefix = ["runuser", "-u", "nobody", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, logfile = folder / "data", folder / "log"

    def pg(*args, check=True):
        return subprocess.run([*prefix, *args], capture_output=True, text=True, check=check, cwd=folder)

    try:
        pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "sweeper", "-A", "trust", "--no-sync")
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-w", "-t", "30", "start",
           "-o", f"-h 127.0.0.1 -p {port} -k {folder} -F")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL here: {(e.stderr or e.stdout).strip().splitlines()[-1:]}")
    try:
        yield f"postgresql+psycopg://sweeper@127.0.0.1:{port}/postgres"
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_one_postgres_study(tmp_path, recipe, postgres):
    _two_workers(tmp_path, recipe, postgres)
    assert not (tmp_path / "sw" / "study.db").exists()
    assert "sweeper@127.0.0.1" in json.loads((tmp_path / "sw" / "sweep.json").read_text())["storage"]


@pytest.mark.parametrize("url, message", [
    ("nosuchdb://host/db", "--storage nosuchdb://host/db: cannot open the study storage"),
    ("postgresql+psycopg://sweeper:secret@127.0.0.1:1/db", "cannot open the study storage (OperationalError"),
    ("sweeper:secret@127.0.0.1/db", "--storage: not a database URL"),
    ("postgresql+psycopg://sweeper:se@cret@127.0.0.1/db", "write an '@' inside the password as %40"),
])
def test_a_storage_that_cannot_be_opened_is_one_message(tmp_path, recipe, capsys, url, message):
    space = space_file(tmp_path, LR_AND_RANK)
    assert main(["sweep", str(recipe()), "--space", str(space), "--storage", url, "--out", str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "secret" not in err and "cret" not in err
    assert not (tmp_path / "sw").exists()


def test_a_damaged_study_db_is_named_as_the_file_not_as_storage_the_user_never_gave(tmp_path):
    from peft_ft.sweep.study import open_storage

    db = tmp_path / "study.db"
    db.write_bytes(b"not a database at all" * 100)
    with pytest.raises(PeftFtError, match=rf"^{db}: cannot open this study database \(DatabaseError: .*\); it is damaged or "
                                          r"no SQLite database: put back the file the sweep wrote, or start a new sweep"):
        open_storage(f"sqlite:///{db}")


@pytest.mark.parametrize("change, extra, message", [
    (('validation = "valid.jsonl"\n', ""), [], "a sweep picks trials by their validation score, and the recipe has no validation data"),
    (("", ""), ["--resume"], "holds no sweep (sweep.json missing); start it without --resume"),
    (("", ""), ["--workers", "0"], "--workers 0: give 1 to 64"),
    (("", ""), ["--workers", "1000"], "--workers 1000: give 1 to 64"),
    (("", ""), ["--storage", ""], "--storage is empty"),
    (("", ""), ["--storage", "sqlite://"], "an in-memory database cannot hold a study shared by trials/workers; give a file"),
    (("", ""), ["--storage", "sqlite:///:memory:"], "an in-memory database cannot hold a study"),
    (("", ""), ["--study", ""], "--study is empty; give the study's name"),
    (("", ""), ["--study", " "], "--study is empty"),
    (("", ""), ["--set", "train.lr=1e-3"], "--set train.lr=1e-3: train.lr is swept by"),
    (("", ""), ["--set", "train.device=cuda"], 'train.device: "cuda" asked for, but torch sees no CUDA GPU'),
    (('train = "train.jsonl"', 'train = "missing.jsonl"'), [], "data.train: file not found"),
])
def test_sweep_refusals_are_one_message(tmp_path, recipe, capsys, change, extra, message):
    recipe_file = recipe()
    if change[0]:
        recipe_file.write_text(recipe_file.read_text().replace(*change, 1))
    args = ["sweep", str(recipe_file), "--space", str(space_file(tmp_path, LR_AND_RANK)), "--out", str(tmp_path / "sw")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "sw").exists()


def test_a_sweep_where_no_trial_finishes_says_so(tmp_path, recipe, capsys, monkeypatch):
    """Every trial fails (here the run refuses it): the message does not promise that --resume mends what only a
    new space or recipe can."""
    import peft_ft.sweep.study
    from peft_ft.errors import PeftFtError

    def refused(recipe, data_dir=None, hooks=None):
        raise PeftFtError(f"{recipe.source}: refused by the model")

    monkeypatch.setattr(peft_ft.sweep.study, "run", refused)
    space = space_file(tmp_path, LR_AND_RANK)
    assert main(["sweep", str(recipe()), "--space", str(space), "--trials", "2", "--out", str(tmp_path / "sw")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "sweep: no trial finished (2 failed, 0 pruned)" in err and "Traceback" not in err
    assert "start a new sweep with another --out (or remove" in err and "fix it and run again with --resume" not in err
    assert [r["state"] for r in trials_csv(tmp_path / "sw")] == ["fail", "fail"]


@pytest.mark.parametrize("text, message", [
    ("[adapter]\nr = [4, 64]\n", "adapter.r = 64 does not fit the model or machine: adapter.r: 64 is more than this bert "
                                  "model's hidden size (32)"),
    ("[model]\nmax_length = [32, 1024]\n", "model.max_length = 1024 does not fit the model or machine: model.max_length: "
                                           "1024 is more than the 512 positions"),
    # an IA3 recipe: adapter.r applies only in trials that draw lora, and is checked with it
    ("[adapter]\nmethod = [\"ia3\", \"lora\"]\nr = [4, 64]\n", "adapter.r = 64 does not fit the model or machine"),
    # a module the model does not have: validate's check of the weightless model, for the drawn value
    ("[adapter]\ntarget_modules = [[\"query\", \"value\"], [\"nonexistent_mod\"]]\n",
     "adapter.target_modules = ['nonexistent_mod'] does not fit the model or machine: adapter.target_modules"),
])
def test_values_the_model_cannot_take_are_refused_before_any_folder(tmp_path, recipe, capsys, text, message):
    """A value only the model can refuse is checked as `peft-ft validate` checks a recipe, before the folder and
    study are made (otherwise every trial drawing it fails, and --resume cannot mend the space)."""
    space = space_file(tmp_path, text)
    recipe_file = recipe()
    if "ia3" in text:
        recipe_file.write_text(recipe_file.read_text().replace('method = "lora"\nr = 4\nalpha = 8', 'method = "ia3"'))
    assert main(["sweep", str(recipe_file), "--space", str(space), "--trials", "1", "--out", str(tmp_path / "sw")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and f"{space}: " in err and "Traceback" not in err
    assert not (tmp_path / "sw").exists()


def test_a_device_only_some_trials_ask_for_is_refused_before_any_folder(tmp_path, recipe, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    space = space_file(tmp_path, "[train]\ndevice = [\"cpu\", \"cuda\"]\n")
    assert main(["sweep", str(recipe()), "--space", str(space), "--out", str(tmp_path / "sw")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert 'train.device = \'cuda\' does not fit the model or machine: train.device: "cuda" asked for' in err
    assert "Traceback" not in err and not (tmp_path / "sw").exists()


# --- the space file is checked like a recipe ----------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("[train]\nlrr = [1e-3]\n", "train.lrr: not a recipe field (did you mean `train.lr`?)"),
    ("[trian]\nlr = [1e-3]\n", "[trian]: not a recipe section (did you mean [train]?)"),
    ("[train]\nlr = [\"fast\"]\n", 'train.lr[0]: expected a number, got "fast"'),
    ("[train]\nepochs = {low = 1.5, high = 3}\n", "train.epochs.low: expected an integer, got 1.5"),
    ("[train]\nlr = {low = 1e-3, high = 1e-2, log = true, step = 1e-3}\n", "either log or stepped"),
    ("[train]\nlr = {low = 1e-2, high = 1e-3}\n", "low (0.01) must be below high (0.001)"),
    ("[train]\nlr = {low = 0.0, high = 1e-3, log = true}\n", "a log range needs low above 0"),
    ("[train]\nlr = {low = 1e-3, hi = 1e-2}\n", "train.lr.hi: unknown range key"),
    ("[train]\nlr = {low = 1e-4, high = 1e10, log = true}\n", "train.lr.high: must be at most 10.0, got 10000000000.0"),
    ("[train]\nwarmup = [0.5, 1.5]\n", "train.warmup[1]: must be below 1.0, got 1.5"),
    ("[adapter]\nmethod = {low = 1, high = 2}\n", "adapter.method: a range needs a number field"),
    ("[adapter]\nmethod = [\"lora\", \"loar\"]\n", "adapter.method = 'loar' makes the recipe invalid: adapter.method: unknown value 'loar'"),
    ("[adapter]\nnum_virtual_tokens = [10, 20]\n", "adapter.num_virtual_tokens: applies only when adapter.method is"),
    ("[output]\ndir = [\"a\", \"b\"]\n", "output.dir: cannot be swept"),
    ("[eval]\nmetric = [\"accuracy\"]\n", "eval.metric: cannot be swept"),
    ("[sweep]\nsampler = \"grid\"\n[train]\nlr = [1e-3]\n", "sweep.sampler: expected one of 'tpe', 'random'"),
    ("[sweep]\nenqueue = [{\"train.lr\" = 9.0}]\n[train]\nlr = {low = 1e-3, high = 1e-2}\n", "sweep.enqueue[0]: train.lr = 9.0 is outside its range"),
    ("[train]\nlr = 1e-3\n", "train.lr: expected a list of choices or a range"),
    ("[sweep]\nseed = 1\n", "no recipe keys to sweep"),
    ("[sweep]\nenqueue = [{\"train.epochs\" = 1.5}]\n[train]\nepochs = {low = 1, high = 3}\n",
     "sweep.enqueue[0]: train.epochs = 1.5 is not an integer"),
    ("[sweep]\nenqueue = [{\"train.lr\" = 1.5e-3}]\n[train]\nlr = {low = 1e-3, high = 3e-3, step = 1e-3}\n",
     "sweep.enqueue[0]: train.lr = 0.0015 is not on its range's steps"),
    ("[sweep]\nenqueue = [{\"train.lr\" = 5e-3}, 3]\n[train]\nlr = [5e-3, 1e-2]\n", "sweep.enqueue[1]: expected a table"),
    ("[train]\nlr = [0, 0.0, 0.1]\n", "train.lr: the choices repeat a value"),
    ("[train]\nlr = {low = 1e-4, high = 2e-4, step = 1e300}\n", "train.lr: step (1e+300) is larger than high - low (0.0001); only low"),
    ("[train]\nepochs = {low = 1, high = 9223372036854775807}\n", "train.epochs.high: must be at most 10000"),
    # a key both ways: one of the two won without a word
    ('"train.lr" = [1e-3]\n[train]\nlr = [2e-3]\n', 'train.lr is given twice (as "train.lr" and in [train]); keep one'),
    ('[sweep]\nenqueue = [{"train.lr" = 1e-3, train = {lr = 2e-3}}]\n[train]\nlr = [1e-3, 2e-3]\n',
     "sweep.enqueue[0]: train.lr is given twice (dotted and in a table); keep one"),
])
def test_space_errors_name_the_file_and_key(tmp_path, recipe, text, message, capsys):
    space = space_file(tmp_path, text)
    with pytest.raises(SpaceError) as e:
        from peft_ft.sweep.study import load_parts

        load_parts(str(recipe()), str(space), [])
    assert message in str(e.value) and f"{space}: " in str(e.value)
    assert main(["sweep", str(recipe()), "--space", str(space), "--out", str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "sw").exists()  # nothing made before the space is valid


def test_space_collects_every_problem(tmp_path, recipe):
    space = space_file(tmp_path, "[train]\nlrr = [1e-3]\nepochs = [0]\n[adapter]\nr = []\n")
    with pytest.raises(SpaceError) as e:
        from peft_ft.sweep.study import load_parts

        load_parts(str(recipe()), str(space), [])
    assert e.value.problems == ["train.lrr: not a recipe field (did you mean `train.lr`?)",
                                "train.epochs[0]: must be at least 1, got 0", "adapter.r: the list of choices is empty"]


def test_conditional_keys_are_sampled_only_where_they_apply(tmp_path, recipe):
    """adapter.r is a LoRA key: a trial that draws IA3 has no adapter.r and uses IA3's default learning rate."""
    import optuna

    from peft_ft.recipe.load import build_recipe
    from peft_ft.sweep.space import trial_raw
    from peft_ft.sweep.study import load_parts

    text = "[adapter]\nmethod = [\"lora\", \"ia3\"]\nr = [2, 4]\n"
    r, base, space = load_parts(str(recipe()), str(space_file(tmp_path, text)), [])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        values = space.sample(trial, base)
        recipe_ = build_recipe(trial_raw(base, values), r.source)
        seen.add(values["adapter.method"])
        if values["adapter.method"] == "ia3":
            assert "adapter.r" not in values and "r" not in trial_raw(base, values)["adapter"] and recipe_.train.lr == 0.0
        else:
            assert values["adapter.r"] in (2, 4) and recipe_.adapter.r == values["adapter.r"] and recipe_.train.lr == 1e-2
        study.tell(trial, 0.5)
    assert seen == {"lora", "ia3"}


def test_importance_ranks_the_parameter_that_moves_the_value():
    """The ranking is Optuna's fANOVA over finished trials: here the value depends on x alone."""
    import optuna

    from peft_ft.sweep.report import importances, pareto_front

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("train.lr", 0, 1) + 0 * t.suggest_int("adapter.r", 1, 8), n_trials=12)
    ranking, why = importances(study)
    assert why == "" and list(ranking) == ["train.lr", "adapter.r"] and ranking["train.lr"] > 0.9
    rows = [{"trial": 0, "value": 0.5, "x": 10}, {"trial": 1, "value": 0.6, "x": 20}, {"trial": 2, "value": 0.55, "x": 30},
            {"trial": 3, "value": 0.5, "x": 10}]
    assert pareto_front(rows, "x") == {0, 1, 3}  # 2 is beaten by 1 on both; 0 and 3 tie


SPACES = sorted((Path(__file__).resolve().parent.parent / "spaces").glob("*.toml"))


@pytest.mark.parametrize("space", SPACES, ids=[s.stem for s in SPACES])
def test_shipped_spaces_are_valid_for_their_recipes(space):
    """spaces/NAME.toml sweeps recipes/NAME.toml."""
    from peft_ft.sweep.study import load_parts

    recipe_file = space.parent.parent / "recipes" / space.name
    _, _, loaded = load_parts(str(recipe_file), str(space), [])
    assert loaded.params


# --- refusals that leave nothing behind, and --resume that finds its own study -------------------


def test_recipe_and_space_with_a_byte_order_mark_are_read(tmp_path, recipe):
    """An editor's UTF-8 byte-order mark: `peft-ft validate` reads such a recipe, so must the sweep (and its space)."""
    from peft_ft.sweep.study import load_parts

    recipe_file = recipe()
    recipe_file.write_bytes(b"\xef\xbb\xbf" + recipe_file.read_bytes())
    space = space_file(tmp_path, LR_AND_RANK)
    space.write_bytes(b"\xef\xbb\xbf" + space.read_bytes())
    loaded, base, parsed = load_parts(str(recipe_file), str(space), [])
    assert base["adapter"]["r"] == 4 and [p.key for p in parsed.params] == ["train.lr", "adapter.r"]


def test_a_quoted_dotted_key_is_the_recipe_key(tmp_path, recipe):
    from peft_ft.sweep.study import load_parts

    space = space_file(tmp_path, '"train.lr" = [1e-3, 2e-3]\n[adapter]\nr = [2, 4]\n')
    _, _, parsed = load_parts(str(recipe()), str(space), [])
    assert [(p.key, p.choices) for p in parsed.params] == [("train.lr", (1e-3, 2e-3)), ("adapter.r", (2, 4))]


PLAN = {"recipe": "r.toml", "space": "s.toml", "overrides": [], "study": "s", "trials": 2, "data_dir": None, "metric": "m",
        "storage": "sqlite:///x.db", "workers": 1, "fingerprint": "f"}


@pytest.mark.parametrize("text, message", [
    ('{"recipe": "r.toml", "spa', "sweep.json: damaged, not JSON"),
    ("[1, 2]", "sweep.json: damaged, expected a JSON object"),
    ('{"recipe": "r.toml", "colour": 1}', "sweep.json: damaged (unknown key(s) 'colour'; missing key(s) 'space'"),
    # keys all there, values of the wrong type (tracebacks, after the bad value had been written back)
    (json.dumps({**PLAN, "trials": "abc"}), 'sweep.json: damaged (trials: expected a whole number, got "abc")'),
    (json.dumps({**PLAN, "data_dir": 7, "storage": 5}), "sweep.json: damaged (data_dir: expected a string or null, got 7; "
                                                         "storage: expected a string, got 5)"),
    (json.dumps({**PLAN, "overrides": [1]}), "sweep.json: damaged (overrides: expected a list of strings, got [1])"),
    (json.dumps({**PLAN, "workers": 0}), "sweep.json: damaged (workers: expected 1 or more, got 0)"),
])
def test_a_damaged_sweep_json_is_one_message(tmp_path, recipe, capsys, text, message):
    sweep_dir = tmp_path / "sw"
    (sweep_dir / "trials").mkdir(parents=True)
    (sweep_dir / "sweep.json").write_text(text)
    args = ["sweep", str(recipe()), "--space", str(space_file(tmp_path, LR_AND_RANK)), "--out", str(sweep_dir), "--resume"]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "start a new sweep with another --out" in err and "Traceback" not in err
    assert (sweep_dir / "sweep.json").read_text() == text  # left as it was



def test_a_study_of_another_space_is_refused_before_the_folder_is_made(tmp_path, recipe, capsys):
    """The suggested fix (--study S2) then works: no sweep.json or trials/ left to refuse it."""
    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(storage=url, study_name="sent").set_user_attr("fingerprint", "another space")
    args = ["sweep", str(recipe()), "--space", str(space_file(tmp_path, LR_AND_RANK)), "--trials", "1",
            "--out", str(tmp_path / "sw"), "--storage", url]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "was started from another recipe, space or --set (or another metric); name a new study with --study" in err
    assert not (tmp_path / "sw").exists()
    assert main(args + ["--study", "S2"]) == 0
    assert [t.state.name for t in open_study(url, "S2").trials] == ["COMPLETE"]


def test_resume_finds_the_same_study_and_data_from_any_directory(tmp_path, recipe, monkeypatch, capsys):
    """A relative sqlite:/// path is recorded as the file it named; --resume refuses another file, another data
    folder and a study that is gone, rather than starting an empty study; run_dir is relative to the sweep folder."""
    here, elsewhere = tmp_path / "a", tmp_path / "b"
    here.mkdir()
    elsewhere.mkdir()
    db = here / "relative.db"
    command = ["sweep", str(recipe()), "--space", str(space_file(tmp_path, LR_AND_RANK)), "--trials", "1"]
    monkeypatch.chdir(here)
    assert main(command + ["--out", "sw", "--storage", "sqlite:///relative.db"]) == 0
    sweep_dir = here / "sw"
    assert json.loads((sweep_dir / "sweep.json").read_text())["storage"] == f"sqlite:///{db}"
    (row,) = trials_csv(sweep_dir)
    assert row["run_dir"].startswith("trials/trial-0000/") and (sweep_dir / row["run_dir"] / "metrics.json").is_file()
    reports = (sweep_dir / "trials.csv").read_bytes()
    capsys.readouterr()

    monkeypatch.chdir(elsewhere)  # the same relative URL names another file here
    assert main(command + ["--out", str(sweep_dir), "--resume", "--storage", "sqlite:///relative.db"]) == 2
    assert f"stored in sqlite:///{db}, not sqlite:///{elsewhere / 'relative.db'}" in capsys.readouterr().err
    assert not (elsewhere / "relative.db").exists()

    other_data = tmp_path / "other-data"
    shutil.copytree(tmp_path / "data", other_data)
    assert main(command + ["--out", str(sweep_dir), "--resume", "--storage", f"sqlite:///{db}", "--data-dir", str(other_data)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"trials train on the data in {tmp_path / 'data'}, not {other_data}" in err and "Traceback" not in err

    db.rename(tmp_path / "moved.db")
    assert main(command + ["--out", str(sweep_dir), "--resume", "--storage", f"sqlite:///{db}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"the study 'sent' of {sweep_dir} is not found: no database file {db}" in err and "Traceback" not in err
    assert not db.exists() and (sweep_dir / "trials.csv").read_bytes() == reports


def test_a_trial_stopped_by_ctrl_c_is_reported_as_interrupted(tmp_path, recipe, monkeypatch, capsys):
    """Not a failure, not an ended trial; its run folder named and its checkpoints removed (its rerun starts anew);
    the sweep's --resume is what the user is told, not the run's `peft-ft run --resume`."""
    import logging

    import peft_ft.sweep.study

    real_run = peft_ft.sweep.study.run

    def stopped(recipe, data_dir=None, hooks=None):
        run_dir = Path(recipe.output.dir) / recipe.output.name / "20260101-000000"
        (run_dir / "checkpoints" / "step-2").mkdir(parents=True)
        logging.getLogger("peft_ft").warning("interrupted (SIGINT): checkpoint written; continue with `peft-ft run --resume %s`", run_dir)
        raise KeyboardInterrupt

    space, sweep_dir = space_file(tmp_path, LR_AND_RANK), tmp_path / "sw"
    monkeypatch.setattr(peft_ft.sweep.study, "run", stopped)
    with pytest.raises(KeyboardInterrupt):
        sweep(str(recipe()), str(space), trials=1, out=str(sweep_dir))
    said = " ".join(capsys.readouterr().out.split())
    assert "peft-ft run --resume" not in said and "run the same command with --resume to go on" in said
    (trial,) = finished(sweep_dir).trials
    assert trial.user_attrs["run_dir"] == "trials/trial-0000/20260101-000000"
    assert (sweep_dir / trial.user_attrs["run_dir"]).is_dir() and not (sweep_dir / trial.user_attrs["run_dir"] / "checkpoints").exists()

    monkeypatch.setattr(peft_ft.sweep.study, "run", real_run)
    sweep(str(recipe()), str(space), trials=1, out=str(sweep_dir), resume=True)
    said = " ".join(capsys.readouterr().out.split())
    assert "failed" not in said
    assert [(r["trial"], r["state"]) for r in trials_csv(sweep_dir)] == [("1", "complete"), ("0", "interrupted, rerun as trial 1")]
    md = (sweep_dir / "sweep.md").read_text()
    assert "1 trial(s) ended of 1" in md and "| 0 | interrupted, rerun as trial 1 |" in md
