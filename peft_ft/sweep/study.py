"""`peft-ft sweep`: hyperparameter search over a recipe with Optuna.

A sweep folder holds `sweep.json` (what is swept, how many trials), the study (`study.db`, SQLite,
unless `--storage` names another database), one ordinary run folder per trial under `trials/`, and
the reports (`peft_ft.sweep.report`). Workers are processes that share the study through its
storage: `--workers K` starts K on this machine, and the same command on another machine with the
same `--storage` URL joins the same study. Each worker asks the study for a trial, trains it in
its own process with `peft_ft.engine.run.run`, reports each epoch's validation value to the trial (the
median pruner stops trials below the median of earlier ones at that epoch), and stops once the
study holds `--trials` trials. Trials select on validation only: their test splits are left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import sys
import types
import typing
import warnings
from pathlib import Path

from peft_ft import log as log_module
from peft_ft.compare.variants import with_overrides
from peft_ft.data.files import resolve_data_dir, split_sources
from peft_ft.engine.device import check_device
from peft_ft.engine.run import run
from peft_ft.engine.train import TrainHooks
from peft_ft.errors import PeftFtError, RecipeError
from peft_ft.log import setup_logging
from peft_ft.methods import METHODS, check_on_skeleton, needs_skeleton
from peft_ft.models.integrity import base_config
from peft_ft.models.loading import check_model_config, resolve_model, settle_hub_mode
from peft_ft.recipe.load import build_recipe, load_recipe, read_recipe_file
from peft_ft.rundir.layout import CHECKPOINTS, read_metrics
from peft_ft.storage import write_json
from peft_ft.sweep.report import write_reports
from peft_ft.sweep.space import SpaceError, current_value, load_space, trial_raw
from peft_ft.tasks import TASKS

log = logging.getLogger("peft_ft")
SWEEP_FILE = "sweep.json"
STUDY_DB = "study.db"
TRIALS = "trials"
MAX_WORKERS = 64  # local processes, each loading torch and a model: a typo must not fork a thousand
STORAGE_ENV = "PEFT_FT_SWEEP_STORAGE"  # hands the URL to workers outside argv, where `ps` would show a password
DEFAULT_TRIALS = 20


@dataclasses.dataclass
class Plan:
    """What a sweep is, as written to sweep.json; every worker and `--resume` reads it back."""

    recipe: str  # the recipe file (absolute), the source of its messages and of a relative data.dir
    space: str  # the space file (absolute)
    overrides: list[str]
    study: str
    trials: int
    data_dir: str | None
    metric: str
    storage: str  # shown with its password hidden; the real URL travels in STORAGE_ENV
    workers: int  # local worker processes of the run that wrote this file
    fingerprint: str  # of the recipe, overrides and space: a study started from others is refused

    @classmethod
    def read(cls, sweep_dir: Path) -> "Plan":
        """sweep.json as written; a damaged one (cut short by a full disk, edited by hand) is one message."""
        path = sweep_dir / SWEEP_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PeftFtError(f"{path}: damaged, not JSON ({e}); {DAMAGED_HINT}") from None
        except OSError as e:
            raise PeftFtError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict):
            raise PeftFtError(f"{path}: damaged, expected a JSON object with the keys {', '.join(names)}; {DAMAGED_HINT}")
        unknown, missing = [k for k in data if k not in names], [k for k in names if k not in data]
        if unknown or missing:
            said = "; ".join(([f"unknown key(s) {', '.join(map(repr, unknown))}"] if unknown else []) +
                             ([f"missing key(s) {', '.join(map(repr, missing))}"] if missing else []))
            raise PeftFtError(f"{path}: damaged ({said}); {DAMAGED_HINT}")
        hints = typing.get_type_hints(cls)
        wrong = [f"{k}: expected {_type_name(hints[k])}, got {json.dumps(v)[:40]}" for k, v in data.items() if not _fits(v, hints[k])]
        wrong += [f"{k}: expected 1 or more, got {data[k]}" for k in ("trials", "workers") if not wrong and data[k] < 1]
        if wrong:
            raise PeftFtError(f"{path}: damaged ({'; '.join(wrong)}); {DAMAGED_HINT}")
        return cls(**data)


def _fits(value, hint) -> bool:
    """`value` read from JSON is of the type `hint` (str, int, list[str], str | None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def _type_name(hint) -> str:
    return {str: "a string", int: "a whole number", list[str]: "a list of strings", str | None: "a string or null"}.get(hint, str(hint))


# sweep.json records what the sweep is; without it, a sweep cannot be resumed or reported
DAMAGED_HINT = ("put back the sweep.json this sweep wrote, or start a new sweep with another --out "
                "(or remove the folder)")


def load_parts(recipe_path: str, space_path: str, overrides: list[str]) -> tuple:
    """The base recipe (validated), its raw TOML with overrides, and the space checked against it."""
    recipe = load_recipe(recipe_path, overrides)
    base = with_overrides(read_recipe_file(recipe_path), overrides)  # read as every recipe is (a byte-order mark...)
    if not (recipe.data.validation or recipe.data.validation_fraction or recipe.data.hub):
        raise PeftFtError(f"{recipe_path}: a sweep picks trials by their validation score, and the recipe has no "
                          f"validation data; set data.validation or data.validation_fraction")
    space = load_space(space_path, recipe, base)
    _check_overrides_not_swept(overrides, space)
    return recipe, base, space


def _check_overrides_not_swept(overrides: list[str], space) -> None:
    """A `--set` of a swept key would be overridden in every trial by the sampled value: refuse it, not ignore it."""
    swept = {p.key for p in space.params}
    idle = [t for t in overrides if t.split("=", 1)[0].strip() in swept]
    if idle:
        raise RecipeError("--set", [f"--set {t}: {t.split('=', 1)[0].strip()} is swept by {space.source}, which sets "
                                    f"it in every trial; remove it from --set, or from the space" for t in idle])


def fingerprint(recipe_path: str, space_path: str, overrides: list[str]) -> str:
    text = "\0".join([Path(recipe_path).read_text(encoding="utf-8"), Path(space_path).read_text(encoding="utf-8"), *overrides])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def storage_url(sweep_dir: Path, given: str | None) -> str:
    return given or f"sqlite:///{(sweep_dir / STUDY_DB).resolve()}"


def sqlite_file(url: str) -> str | None:
    """The database file of a SQLite URL; None for another database or a malformed URL (shown_url reports it)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    return (parsed.database or "") if parsed.get_backend_name() == "sqlite" else None


def absolute_storage(url: str) -> str:
    """--storage as one place whatever the working directory: sqlite:///relative.db resolved to an absolute
    file (from another directory, `--resume` would otherwise open, or create, another file). An in-memory
    SQLite is refused: it dies with the process that made it, and trials and workers open their own."""
    from sqlalchemy.engine import make_url

    path = sqlite_file(url)
    if path is None:
        return url
    if path in ("", ":memory:") or make_url(url).query.get("mode") == "memory":
        raise PeftFtError(f"--storage {url}: an in-memory database cannot hold a study shared by trials/workers; give a "
                          f"file (sqlite:///path.db) or a server, or leave --storage out for study.db in the sweep folder")
    if path.startswith("file:"):  # a SQLite URI filename: left as written
        return url
    return make_url(url).set(database=str(Path(path).expanduser().resolve())).render_as_string(hide_password=False)


def shown_url(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    authority = url.partition("://")[2].partition("/")[0]
    if authority.count("@") > 1:  # sqlalchemy would take the password's tail for the host, and show it
        raise PeftFtError("--storage: more than one '@' before the host; write an '@' inside the password as %40 "
                          "(and ':' as %3A, '/' as %2F)")
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not shown back: a malformed URL may still hold a password
        raise PeftFtError("--storage: not a database URL; use one such as postgresql+psycopg://user:pass@host/db "
                          "(pip install 'peft-ft[postgres]') or sqlite:///path/study.db") from None


def open_storage(url: str):
    """RDB storage with heartbeats: a trial whose worker died (killed, machine lost) is failed after
    the grace period and queued again with the same values, whoever notices first."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Our log says what happens to each trial; Optuna's would repeat it, with a traceback for a failed
    # trial even when the cause is a message for the user (a diverging loss).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        return RDBStorage(url, heartbeat_interval=30, grace_period=120,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    except Exception as e:  # sqlalchemy: bad URL, server down, driver missing; all the user's to fix
        why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        file = sqlite_file(url)
        if file and Path(file).is_file():  # the URL is right, the file is not (the sweep folder's own study.db, often)
            raise PeftFtError(f"{file}: cannot open this study database ({why}); it is damaged or no SQLite database: "
                              f"put back the file the sweep wrote, or start a new sweep with another --out") from None
        raise PeftFtError(f"--storage {shown_url(url)}: cannot open the study storage ({why}). Use an RDB URL such as "
                          f"postgresql+psycopg://user:pass@host/db (pip install 'peft-ft[postgres]') or sqlite:///path/study.db") from None


# --- starting and resuming ----------------------------------------------------------------------


def sweep(recipe_path: str, space_path: str, trials: int | None = None, storage: str | None = None, workers: int = 1,
          resume: bool = False, out: str | None = None, overrides: list[str] = (), data_dir: str | None = None,
          study: str | None = None) -> Path:
    """Run a sweep to `trials` trials in all; returns the sweep folder (with its reports). One worker
    runs in this process; several run in processes of their own."""
    setup_logging(None)
    if not 1 <= workers <= MAX_WORKERS:
        raise PeftFtError(f"sweep: --workers {workers}: give 1 to {MAX_WORKERS} (each worker is a process that trains; "
                          f"more machines join with the same --storage)")
    if trials is not None and trials < 1:
        raise PeftFtError("sweep: --trials must be at least 1")
    if storage is not None and not storage.strip():  # `--storage "$URL"` with URL unset: not the local default
        raise PeftFtError("--storage is empty; give the database URL, or leave --storage out for study.db in the sweep folder")
    if study is not None and not study.strip():  # `--study "$NAME"` with NAME unset: not the default name
        raise PeftFtError("--study is empty; give the study's name, or leave --study out for the recipe's file name")
    storage = absolute_storage(storage) if storage else storage
    recipe, base, space = load_parts(recipe_path, space_path, list(overrides))
    sweep_dir = Path(out) if out else Path(recipe.output.dir) / f"sweep-{Path(recipe_path).stem}"
    previous = _check_folder(sweep_dir, resume)
    if previous and data_dir is None:  # as `run --resume`: the data the sweep started on, wherever this runs from
        data_dir = previous.data_dir
    _check_files(recipe, data_dir)
    check_values_fit_model(recipe, base, space)
    url = storage_url(sweep_dir, storage)
    plan = Plan(
        recipe=str(Path(recipe_path).resolve()), space=str(Path(space_path).resolve()), overrides=list(overrides),
        study=study or (previous.study if previous else Path(recipe_path).stem),
        trials=trials or (previous.trials if previous else DEFAULT_TRIALS),
        data_dir=None if recipe.data.hub else str(resolve_data_dir(recipe, data_dir)),
        metric=recipe.eval.metric or _default_metric(recipe), storage=shown_url(url),
        workers=workers, fingerprint=fingerprint(recipe_path, space_path, list(overrides)),
    )
    if previous:
        _check_same_study(previous, plan, sweep_dir, given_storage=storage is not None)
    # Everything that can refuse the study (a database that cannot be reached, a study of another space under
    # this name, a resumed study that is not there) is asked before any folder is made: the fix the message
    # suggests (--study S2, --storage) must then work, not meet a half-made folder.
    if storage or previous:
        _check_storage(url, plan, sweep_dir, resume=previous is not None)
    made = not sweep_dir.exists()
    try:
        (sweep_dir / TRIALS).mkdir(parents=True, exist_ok=True)
        write_json(sweep_dir / SWEEP_FILE, dataclasses.asdict(plan))
        created = create_study(url, plan, space)
    except BaseException:
        if made:  # a refused new sweep leaves nothing that blocks running it again
            shutil.rmtree(sweep_dir, ignore_errors=True)
        raise
    log.info("sweep %s: study %r in %s (%s), %d trial(s) in all, %d worker(s) here",
             sweep_dir, plan.study, plan.storage, "new" if created else "joined", plan.trials, workers)
    if resume:
        requeue_stopped_trials(url, plan.study)
    if workers == 1:
        try:
            work(sweep_dir, url, 0)
        except KeyboardInterrupt:
            log.warning("interrupted: finished trials are kept in the study; run the same command with --resume to go on")
            raise
    else:
        _start_workers(sweep_dir, url, workers)
    study_now = open_study(url, plan.study)
    write_reports(sweep_dir, study_now, plan, base, space)
    _check_finished(study_now, sweep_dir)
    return sweep_dir


def _check_storage(url: str, plan: Plan, sweep_dir: Path, resume: bool) -> None:
    """The storage opens; on --resume it holds the sweep's study (else Optuna would start an empty one, numbered
    from 0, and the reports would hold only its trials); a study already there was started from this sweep's
    recipe, space and --set."""
    import optuna

    path = sqlite_file(url)
    if resume and path is not None and not Path(path).is_file():  # opening it would make an empty database
        raise PeftFtError(f"sweep --resume: the study {plan.study!r} of {sweep_dir} is not found: no database file {path}; "
                          f"put the file back (or pass the --storage it is in), or start a new sweep with another --out")
    storage = open_storage(url)
    try:
        names = optuna.study.get_all_study_names(storage)
        if resume and plan.study not in names:
            raise PeftFtError(f"sweep --resume: the study {plan.study!r} of {sweep_dir} is not found in {plan.storage} "
                              f"(it holds {', '.join(map(repr, names)) or 'no study'}); pass the --storage it is in, or "
                              f"start a new sweep with another --out")
        if plan.study in names:
            check_study_fits(optuna.load_study(storage=storage, study_name=plan.study), plan)
    finally:
        storage.engine.dispose()  # no pooled connection for forked workers to inherit


def check_study_fits(study, plan: Plan) -> None:
    """A study joined or resumed must be this sweep's: the same recipe, space, --set and metric."""
    if study.user_attrs.get("fingerprint") != plan.fingerprint or study.user_attrs.get("metric") != plan.metric:
        raise PeftFtError(f"sweep: the study {plan.study!r} in {plan.storage} was started from another recipe, space "
                          f"or --set (or another metric); name a new study with --study")


def _check_same_study(previous: Plan, plan: Plan, sweep_dir: Path, given_storage: bool) -> None:
    """`--resume` goes on with the study it started: the same recipe, space and --set, the same study name in
    the same storage. Another --study, or a sweep on a database resumed without --storage, would otherwise
    start an empty study and report it as this sweep."""
    if previous.fingerprint != plan.fingerprint:
        raise PeftFtError(f"sweep --resume: {sweep_dir} was started from another recipe, space or --set than now "
                          f"({previous.recipe}, {previous.space}); resume with those, or start a new sweep with --out")
    if previous.study != plan.study:
        raise PeftFtError(f"sweep --resume: {sweep_dir} holds the study {previous.study!r}, not {plan.study!r}; "
                          f"leave --study out to resume it, or start a new sweep with --out")
    def own_file(url: str) -> bool:  # the default: study.db in the sweep folder, wherever the folder now is
        return url.startswith("sqlite:///") and url.endswith(f"/{STUDY_DB}")

    moved = not given_storage and own_file(previous.storage)  # a default study resumed without --storage
    if previous.storage != plan.storage and not moved:
        raise PeftFtError(f"sweep --resume: {sweep_dir}'s study is stored in {previous.storage}, not {plan.storage}; "
                          f"pass the same --storage URL to resume it")
    if previous.data_dir != plan.data_dir:  # as `run --resume`: trials of one study train on the same data
        raise PeftFtError(f"sweep --resume: {sweep_dir}'s trials train on the data in {previous.data_dir}, not "
                          f"{plan.data_dir}; leave --data-dir out (or give {previous.data_dir}) to resume, or start a "
                          f"new sweep on the other data with another --out")


def check_values_fit_model(recipe, base: dict, space) -> None:
    """What `peft-ft validate` asks of the model's config.json and of this machine, for each choice and range end
    (an adapter.r above the model's width, a model.max_length past its positions, a device it lacks): otherwise it
    passes the space check and fails every trial that draws it, in a sweep that --resume cannot mend."""
    locations, problems, built = {recipe.model.name: resolve_model(recipe)}, [], set()
    for key, value, values in space.probes(base):
        try:
            trial = build_recipe(trial_raw(base, values), recipe.source)
        except RecipeError:
            continue  # a combination the space check does not make (it probed each value alone)
        try:
            check_device(trial)
            if trial.model.name not in locations:
                locations[trial.model.name] = resolve_model(trial)
            location, auto_class = locations[trial.model.name], TASKS[trial.task.type].auto_class
            check_model_config(location, trial, auto_class, METHODS[trial.adapter.method].config_check)
            # named target modules exist (validate's question of the weightless model), once per model, method and names
            what = (location, trial.adapter.method, tuple(trial.adapter.target_modules or ()), auto_class)
            if what not in built and needs_skeleton(trial, (base_config(location) or {}).get("model_type")):
                built.add(what)
                check_on_skeleton(location, trial, auto_class, {})
        except PeftFtError as e:  # check_model_config names the recipe on each line: the key is what matters here
            problems += [f"{key} = {value!r} does not fit the model or machine: {line.removeprefix(f'{recipe.source}: ')}"
                         for line in str(e).splitlines()]
    if problems:
        raise SpaceError(space.source, problems)


def _check_files(recipe, data_dir: str | None) -> None:
    """The recipe's model, device and data files: otherwise every trial would fail the same way."""
    check_device(recipe)
    settle_hub_mode(recipe)
    resolve_model(recipe)
    split_sources(recipe, None if recipe.data.hub else resolve_data_dir(recipe, data_dir))


def _check_finished(study, sweep_dir: Path) -> None:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    failed = sum(1 for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
    if TrialState.COMPLETE not in states:
        # --resume keeps the recipe, space and --set (their fingerprint): it mends only a cause outside them
        raise PeftFtError(f"sweep: no trial finished ({failed} failed, {states.count(TrialState.PRUNED)} pruned); the "
                          f"reason of each failure is logged above and in its train.log under {sweep_dir / TRIALS}. If "
                          f"the recipe, the space or --set must change, start a new sweep with another --out (or remove "
                          f"{sweep_dir}); if the cause was elsewhere (a full disk, a busy GPU), fix it and run the same "
                          f"command with --resume")
    if failed:
        log.warning("sweep: %d trial(s) failed; see trials.csv and their train.log", failed)


def _default_metric(recipe) -> str:
    return TASKS[recipe.task.type].default_metric


def _check_folder(sweep_dir: Path, resume: bool) -> Plan | None:
    if resume:
        if not (sweep_dir / SWEEP_FILE).is_file():
            raise PeftFtError(f"sweep --resume: {sweep_dir} holds no sweep ({SWEEP_FILE} missing); start it without --resume")
        return Plan.read(sweep_dir)
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise PeftFtError(f"sweep: {sweep_dir} already holds a sweep; pass --resume to continue it, or choose another "
                          f"folder with --out")
    return None


def create_study(url: str, plan: Plan, space) -> bool:
    """Create the study (and queue the space's `enqueue` trials) or join it; True when created here."""
    import optuna

    storage = open_storage(url)
    try:
        study = optuna.create_study(storage=storage, study_name=plan.study, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=plan.study)
        storage.engine.dispose()  # no pooled connection for forked workers to inherit
        check_study_fits(study, plan)  # asked before the folder was made; again for a study made since
        return False
    study.set_user_attr("fingerprint", plan.fingerprint)
    study.set_user_attr("metric", plan.metric)
    for values in space.enqueue:
        study.enqueue_trial(values)  # once, by the worker that creates the study
    storage.engine.dispose()  # no pooled connection for forked workers to inherit
    return True


def open_study(url: str, name: str, sampler=None, pruner=None):
    import optuna

    return optuna.load_study(storage=open_storage(url), study_name=name, sampler=sampler, pruner=pruner)


def requeue_stopped_trials(url: str, name: str) -> None:
    """On --resume: trials stopped by Ctrl-C, and trials left RUNNING by a worker of this machine that
    no longer exists, are queued again with their values (other machines' trials wait for their
    heartbeat to go stale)."""
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(url)
    study = optuna.load_study(storage=storage, study_name=name)
    callback = storage.get_heartbeat_stale_trial_callback()
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
            log.info("trial %d: stopped by Ctrl-C; queued again", t.number)
            callback(study, t)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == socket.gethostname() and not _alive(t.user_attrs.get("pid")):
            try:
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            log.info("trial %d: its worker (pid %s) is gone; queued again", t.number, t.user_attrs.get("pid"))
            callback(study, study._storage.get_trial(t._trial_id))
    storage.engine.dispose()  # no pooled connection for forked workers to inherit


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_workers(sweep_dir: Path, url: str, workers: int) -> None:
    """K worker processes. On Linux they fork from this one: what it has imported (all of torch, in
    a program that already trained) they need not import again; elsewhere they start fresh."""
    import multiprocessing

    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    children = [context.Process(target=_worker_process, args=(sweep_dir, url, i), name=f"sweep-worker-{i}")
                for i in range(workers)]
    for child in children:
        child.start()
    try:
        for child in children:
            child.join()
    except KeyboardInterrupt:
        for child in children:  # they got the terminal's SIGINT too; make sure they are gone before we report
            child.terminate()
        for child in children:
            child.join()
        log.warning("interrupted: finished trials are kept in the study; run the same command with --resume to go on")
        raise
    failed = [str(i) for i, child in enumerate(children) if child.exitcode]
    if failed:
        raise PeftFtError(f"sweep: worker(s) {', '.join(failed)} stopped with an error (see above); finished trials are "
                          f"kept, fix the cause and run again with --resume")


def _worker_process(sweep_dir: Path, url: str, worker: int) -> None:
    from rich.console import Console

    # Several live progress bars redrawing one terminal garble it: workers print log lines only
    # (a bar still prints once, when its epoch ends).
    log_module._console = Console(force_interactive=False)
    raise SystemExit(worker_main([str(sweep_dir), "--worker", str(worker)], url))


# --- one worker ---------------------------------------------------------------------------------


def counted(study) -> int:
    """Trials that count towards --trials: those started (running or ended), but not the failed ones
    queued again (their retry counts once it starts). Queued trials are taken before new ones."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(1 for t in trials if t.state != TrialState.WAITING and t.number not in retried)


def worker_sampler(settings, worker: int, existing: int):
    """Each worker (and each resume) gets its own seed, derived from the space's: with one seed
    they would all draw the same first values."""
    import optuna

    seed = random.Random(f"{settings.seed}:{socket.gethostname()}:{worker}:{existing}").randrange(2**31)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials)


def worker_pruner(settings):
    import optuna

    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    # Steps are epochs from 1; the earliest prune is at step == n_warmup_steps.
    return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                       n_warmup_steps=settings.pruner_warmup_epochs + 1)


def work(sweep_dir: Path, url: str, worker: int) -> int:
    """One worker: trials until the study holds plan.trials of them; returns how many it ran."""
    plan = Plan.read(sweep_dir)
    recipe, base, space = load_parts(plan.recipe, plan.space, plan.overrides)
    if fingerprint(plan.recipe, plan.space, plan.overrides) != plan.fingerprint:
        raise PeftFtError(f"sweep: {plan.recipe} or {plan.space} changed since the sweep started; start a new sweep")
    probe = open_study(url, plan.study)
    study = open_study(url, plan.study, worker_sampler(space.settings, worker, len(probe.trials)), worker_pruner(space.settings))
    ran = 0
    while counted(study) < plan.trials:
        study.optimize(lambda trial: run_trial(trial, sweep_dir, plan, base, space), n_trials=1, catch=(PeftFtError,))
        ran += 1
    return ran


def trial_recipe(trial, values: dict, sweep_dir: Path, plan: Plan, base: dict):
    """The recipe of one trial: the sampled values, its run folder under the sweep, no test splits
    (a sweep selects on validation only), and a share of this machine's cores when train.threads is 0."""
    raw = trial_raw(base, values)
    raw["output"] = {"dir": str(sweep_dir / TRIALS), "name": f"trial-{trial.number:04d}"}
    data = raw.setdefault("data", {})
    data.pop("test", None)
    data.pop("predict", None)
    if not current_value(raw, {}, "train.threads"):
        raw.setdefault("train", {})["threads"] = max(1, (os.cpu_count() or 1) // plan.workers)
    return build_recipe(raw, plan.recipe)


def run_trial(trial, sweep_dir: Path, plan: Plan, base: dict, space) -> float:
    """Train one trial; its value is the best epoch's validation metric (the epoch its weights keep)."""
    import optuna

    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    values = space.sample(trial, base)
    recipe = trial_recipe(trial, values, sweep_dir, plan, base)
    log.info("trial %d: %s", trial.number, ", ".join(f"{k} = {v}" for k, v in values.items()))

    def on_evaluation(entry: dict) -> None:
        value = entry.get(f"validation_{plan.metric}")
        if value is None:
            return
        # Trials are compared at the same point: the epoch, or the optimizer step with train.eval_every.
        at = entry["steps"] if recipe.train.eval_every else entry["epoch"]
        trial.report(value, at)
        if trial.should_prune():
            where = f"step {at}" if recipe.train.eval_every else f"epoch {at}"
            raise optuna.TrialPruned(f"{where}: validation {plan.metric} {value:.4f} is below the median of earlier trials")

    hint_filter = _NoRunResumeHint()
    log.addFilter(hint_filter)
    try:
        run_dir = run(recipe, plan.data_dir, hooks=TrainHooks(on_evaluation=on_evaluation))
    except (optuna.TrialPruned, PeftFtError) as e:
        _keep_stopped_run(trial, sweep_dir)
        if isinstance(e, optuna.TrialPruned):
            log.info("trial %d pruned: %s", trial.number, e)
        else:
            log.warning("trial %d failed: %s", trial.number, e)
        raise
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)  # --resume runs it again, as a new trial from its first step
        _keep_stopped_run(trial, sweep_dir)
        raise
    finally:
        log.removeFilter(hint_filter)
    metrics = read_metrics(run_dir)
    trial.set_user_attr("run_dir", run_dir_in_sweep(run_dir, sweep_dir))
    trial.set_user_attr("trainable_params", metrics["params"]["trainable_params"])
    trial.set_user_attr("train_seconds", metrics["train"]["seconds"])
    trial.set_user_attr("epochs_run", metrics["train"]["epochs_run"])
    trial.set_user_attr("best_epoch", metrics["train"]["best_epoch"])
    value = metrics["train"]["best_value"]
    log.info("trial %d: validation %s %.4f", trial.number, plan.metric, value)
    return value


def run_dir_in_sweep(run_dir: Path, sweep_dir: Path) -> str:
    """A trial's run folder relative to the sweep folder (trials/trial-0003/<timestamp>), as compare's tables name
    theirs: the same from any working directory, and still right when the sweep folder is moved."""
    return os.path.relpath(Path(run_dir).resolve(), sweep_dir.resolve())


def _keep_stopped_run(trial, sweep_dir: Path) -> None:
    """A pruned, failed or interrupted trial: its run folder recorded, its checkpoints removed (nothing resumes a
    trial's run: --resume runs an interrupted trial again from its first step, as a new trial)."""
    folders = sorted((sweep_dir / TRIALS / f"trial-{trial.number:04d}").glob("*"))
    if folders:
        trial.set_user_attr("run_dir", run_dir_in_sweep(folders[-1], sweep_dir))
        shutil.rmtree(folders[-1] / CHECKPOINTS, ignore_errors=True)


class _NoRunResumeHint(logging.Filter):
    """Drops the run's own Ctrl-C hints (`peft-ft run --resume RUN_DIR`, or "start the run again"): they would
    finish or restart the trial outside its study. The sweep says instead to run the sweep again with --resume."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "peft-ft run --resume" not in message and not message.startswith("interrupted: ")


def worker_main(argv: list[str], url: str | None = None) -> int:
    """`python -m peft_ft.sweep.study SWEEP_DIR --worker I`: one worker, the storage URL from `url`, else
    $PEFT_FT_SWEEP_STORAGE, else the sweep folder's SQLite (a URL in argv would show its password in `ps`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m peft_ft.sweep.study", description="one worker of peft-ft sweep")
    parser.add_argument("sweep_dir")
    parser.add_argument("--worker", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging(None)
    sweep_dir = Path(args.sweep_dir)
    try:
        ran = work(sweep_dir, url or os.environ.get(STORAGE_ENV) or storage_url(sweep_dir, None), args.worker)
    except PeftFtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    log.info("worker %d: %d trial(s)", args.worker, ran)
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
