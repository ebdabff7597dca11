"""What `peft-ft compare` trains: one fully resolved recipe per recipe x method x seed, each a `Variant`, and what a
finished variant leaves in its run folder."""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from peft_ft.data.files import resolve_data_dir, split_sources
from peft_ft.engine.device import check_device
from peft_ft.errors import PeftFtError, RecipeError
from peft_ft.methods import METHODS, unsupported
from peft_ft.models.loading import quiet_transformers, resolve_model, settle_hub_mode
from peft_ft.recipe.dump import to_toml
from peft_ft.recipe.load import apply_overrides, build_recipe, load_recipe, read_recipe_file
from peft_ft.recipe.schema import AdapterSection, Recipe, did_you_mean, section_types
from peft_ft.rundir.layout import METRICS
from peft_ft.tasks import TASKS

log = logging.getLogger("peft_ft")
MEASURE_FILE = "compare.json"  # what the child leaves in its run folder besides the run's own files
LATENCY_EXAMPLES = 256  # examples of the first test split timed per run


@dataclass
class Variant:
    label: str  # the method, or recipe stem and method when several recipes are compared
    recipe: str  # the recipe file it comes from
    method: str
    seed: int
    lr: float  # the resolved learning rate (0 in the recipe = the method's default)
    toml: str  # the variant's fully resolved recipe
    data_dir: str | None  # resolved once by the parent so every variant reads the same files

    @property
    def run_name(self) -> str:
        return f"{self.label}-seed{self.seed}"


def finished_run(compare_dir: Path, run_name: str) -> Path | None:
    """The newest run folder of a variant that got to the end (an interrupted one lacks the files)."""
    done = [p.parent for p in sorted((compare_dir / run_name).glob(f"*/{MEASURE_FILE}")) if (p.parent / METRICS).is_file()]
    return done[-1] if done else None


def parse_lrs(items: list[str], methods: list[str]) -> dict[str, float]:
    """`--lr lora=1e-3` -> {"lora": 0.001}."""
    lrs, problems = {}, []
    for item in items:
        name, _, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = -1.0
        if name not in methods:
            problems.append(f"{item!r}: {name!r} is not among the compared methods ({', '.join(methods)})")
        elif not lr > 0 or lr == float("inf"):  # nan and inf are floats too: named here, not as the recipe's train.lr
            problems.append(f"{item!r}: expected METHOD=LEARNING_RATE with a positive number, e.g. lora=1e-3")
        elif name in lrs:  # which one wins is no guess to leave to argument order
            problems.append(f"{item!r}: two values for {name} ({lrs[name]:g} and {lr:g}); give --lr {name}=... once")
        else:
            lrs[name] = lr
    if problems:
        raise RecipeError("--lr", problems)
    return lrs


ALL = "all"  # --methods all: every registered method that applies to each recipe's task and model


def parse_methods(text: str | None) -> list[str] | None:

    if text is None:
        return None
    if not text.strip():  # `--methods "$METHODS"` with the variable unset: not "the recipe's own"
        raise RecipeError("--methods", ["empty; give `all` or methods separated by commas, or leave --methods out for each recipe's own"])
    if text.strip() == ALL:
        return [ALL]
    names = [m.strip() for m in text.split(",")]
    problems = []
    if not all(names):
        problems.append("an empty item; separate methods by single commas")
    for name in dict.fromkeys(n for n in names if n and n not in METHODS):
        close = did_you_mean(name, list(METHODS))
        problems.append(f"{name!r} is no method" + (f" (did you mean {close!r}?)" if close else ""))
    twice = sorted({n for n in names if n and names.count(n) > 1})
    if twice:
        problems.append(f"{', '.join(map(repr, twice))} named twice")
    if problems:
        problems.append(f"give `all` or distinct methods separated by commas, from: {', '.join(METHODS)}")
        raise RecipeError(f"--methods {text}", problems)
    return names


def drop_other_method_keys(raw: dict, method: str) -> None:
    """Remove keys that apply only to other methods (adapter.r for `full`...): the schema rejects them."""

    for section, cls in section_types().items():
        values = raw.get(section)
        if not isinstance(values, dict):
            continue
        for f in dataclasses.fields(cls):
            allowed = f.metadata["only"].get("adapter.method")
            if allowed is not None and method not in allowed:
                values.pop(f.name, None)


def variant_raw(raw: dict, method: str, seed: int, lr: float | None, name: str, out_dir: Path) -> dict:
    """The recipe's raw TOML (with --set applied) turned into one variant's."""

    raw = copy.deepcopy(raw)
    recipe_method = raw.get("adapter", {}).get("method", AdapterSection().method)
    drop_other_method_keys(raw, method)
    raw.setdefault("adapter", {})["method"] = method
    train = raw.setdefault("train", {})
    train["seed"] = seed
    if lr is not None:
        train["lr"] = lr
    elif method != recipe_method:
        train["lr"] = 0.0  # the recipe's rate was tuned for its own method: use this method's default
    raw["output"] = {"dir": str(out_dir), "name": name}
    return raw


def model_skeleton(recipe, location: str, auto_class: str):
    """The recipe's task model built on the meta device (no weights read): enough to ask which methods fit it."""
    import torch
    import transformers

    quiet_transformers()
    config = transformers.AutoConfig.from_pretrained(location, trust_remote_code=recipe.model.trust_remote_code)
    with torch.device("meta"):
        return getattr(transformers, auto_class).from_config(config, trust_remote_code=recipe.model.trust_remote_code)


def applicable_methods(raw: dict, path: str, location: str, out_dir: Path) -> list[str]:
    """`--methods all` for one recipe: every registered method whose variant validates and that fits the
    model; each one left out is logged with the reason."""

    chosen, skeleton = [], None
    for name, method in METHODS.items():
        try:
            recipe = build_recipe(variant_raw(raw, name, 0, None, name, out_dir), f"{path} [compare: {name}]")
        except RecipeError as e:
            log.info("--methods all: %s left out: %s", name, "; ".join(e.problems))
            continue
        task = TASKS[recipe.task.type]
        skeleton = skeleton or model_skeleton(recipe, location, task.auto_class)
        reason = unsupported(method, recipe, skeleton, location, task.auto_class, task.peft_task_type)
        if reason:
            log.info("--methods all: %s left out: %s", name, reason)
        else:
            chosen.append(name)
    log.info("--methods all for %s: %s", path, ", ".join(chosen))
    return chosen


def _method_only_keys() -> dict[str, tuple]:
    """{dotted key: the methods it applies to} for the keys of some methods only (adapter.r, ...)."""
    return {f"{section}.{f.name}": f.metadata["only"]["adapter.method"]
            for section, cls in section_types().items() for f in dataclasses.fields(cls) if "adapter.method" in f.metadata["only"]}


def load_base(path: str, overrides: list[str]) -> Recipe:
    """The recipe with the `--set` values that apply to its own method. A `--set` key of another compared method
    (adapter.feedforward_modules for ia3 beside a LoRA recipe) reaches that method's variants only; validated
    on the recipe's own method, it was refused."""
    only = _method_only_keys()
    adapter = apply_overrides(read_recipe_file(path), [t for t in overrides if _key(t) == "adapter.method"])[0].get("adapter")
    method = adapter.get("method", AdapterSection().method) if isinstance(adapter, dict) else AdapterSection().method
    return load_recipe(path, [t for t in overrides if method in only.get(_key(t), (method,))])


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def check_overrides_reach(overrides: list[str], methods: list[str]) -> None:
    """A `--set` key of some methods only must apply to one of the compared methods: else it changes nothing."""
    only = _method_only_keys()
    idle = [t for t in overrides if not set(only.get(_key(t), methods)) & set(methods)]
    if idle:
        raise RecipeError("--set", [f"--set {t}: applies only when adapter.method is "
                                    f"{' or '.join(map(repr, only[_key(t)]))}; none of the compared "
                                    f"methods ({', '.join(methods)}) uses it. Remove it, or add such a method to --methods"
                                    for t in idle])


def check_overrides_kept(overrides: list[str]) -> None:
    """`--set output.*` would be overwritten in every variant (compare names and places each run folder itself)."""
    idle = [t for t in overrides if _key(t).split(".")[0] == "output"]
    if idle:
        raise RecipeError("--set", [f"--set {t}: compare names and places each variant's run folder itself "
                                    f"(<--out>/<variant>-seed<N>/); remove it, and give the comparison's folder with --out"
                                    for t in idle])


def with_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of the raw recipe with the `--set` values in, read as their fields want (their problems are
    load_recipe's to report)."""
    return apply_overrides(copy.deepcopy(raw), overrides)[0]


def build_variants(recipes: list[str], methods: list[str] | None, seeds: int, lrs: dict[str, float],
                   overrides: list[str], out_dir: Path, data_dir: str | None) -> list[Variant]:
    """Every (recipe, method, seed), each validated by the schema before anything trains."""

    check_overrides_kept(overrides)
    stems = [Path(r).stem for r in recipes]
    if len(set(stems)) != len(stems):
        raise PeftFtError(f"compare: several recipes share a file name ({', '.join(recipes)}); runs are named by it, rename one")
    first_seed = load_base(recipes[0], overrides).train.seed
    variants = []
    for path, stem in zip(recipes, stems):
        base = load_base(path, overrides)  # the recipe as written must be valid on its own
        settle_hub_mode(base)
        check_device(base)  # train.device = "cuda" on a CPU machine: refused once, not by every run
        location = resolve_model(base)
        resolved_dir = None if base.data.hub else str(resolve_data_dir(base, data_dir))
        split_sources(base, None if base.data.hub else Path(resolved_dir))  # every file exists
        raw = with_overrides(read_recipe_file(path), overrides)
        names = applicable_methods(raw, path, location, out_dir) if methods == [ALL] else methods or [base.adapter.method]
        check_overrides_reach(overrides, names)
        for method in names:
            label = method if len(recipes) == 1 else f"{stem}-{method}"
            for seed in range(first_seed, first_seed + seeds):
                v_raw = variant_raw(raw, method, seed, lrs.get(method), f"{label}-seed{seed}", out_dir)
                recipe = build_recipe(v_raw, f"{path} [compare: {method}, seed {seed}]")
                lr = recipe.train.lr or METHODS[method].default_lr
                variants.append(Variant(label, path, method, seed, lr, to_toml(recipe), resolved_dir))
    return variants


def budget_differences(recipes: list[str], overrides: list[str]) -> list[str]:
    """Keys of data and budget that differ between recipes: their comparison is then not like for like."""

    loaded = [load_base(r, overrides) for r in recipes]
    keys = [f"data.{f.name}" for f in dataclasses.fields(loaded[0].data)] + ["train.epochs", "train.max_steps", "task.type"]
    return [k for k in keys if len({repr(r.get(k)) for r in loaded}) > 1]
