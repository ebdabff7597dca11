"""`peft-ft merge --combine`: several LoRA adapters of one base and task made into one adapter folder.

When it makes sense: the adapters were trained for the *same* task and label set on the same base
(e.g. two SciEntsBank adapters from different seeds or different halves of the data); combining
adapters of different tasks gives a head that answers neither.

The LoRA matrices are combined by peft's `add_weighted_adapter` (`--how`: linear, cat, ties,
dare_ties, dare_linear; `--density` for the TIES/DARE kinds). peft refuses to combine task heads
(`modules_to_save`), so the heads are combined here: the weighted average of the heads' weights,
sum(w_i * head_i) / sum(w_i) (weights (1, 0) keep the first head exactly). The result is a normal
adapter folder: `peft-ft predict`, `serve`, `merge`, `peft_ft.pipeline` and a plain transformers
pipeline load it like a trained run.

`peft-ft predict` / `serve --combine NAME=A:WEIGHT,B:WEIGHT` build the same folder at start-up from adapters
given with `--adapter` and answer under NAME beside them: stacking and averaging at inference. With
`--how cat` the combined update is exactly sum(w_i * update_i) (peft concatenates the ranks), so weights
(1, 1) stack the adapters (what peft computes with several LoRA adapters active at once) and (0.5, 0.5)
average them; `linear` sums the A and the B matrices separately, which adds cross terms.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from peft_ft.data.files import TaskData
from peft_ft.errors import PeftFtError
from peft_ft.models.loading import deepspeed_unused, quiet_transformers
from peft_ft.models.safety import check_no_pickle, model_load_kwargs
from peft_ft.rundir import portable
from peft_ft.rundir.card import usage_section
from peft_ft.rundir.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CARD, INFO, RECIPE, read_info, read_recipe
from peft_ft.rundir.load import base_location
from peft_ft.serving.merge import check_out, staged
from peft_ft.storage import write_atomic, write_json
from peft_ft.tasks import TASKS

HOWS = ("linear", "cat", "ties", "dare_ties", "dare_linear")
PRUNING = ("ties", "dare_ties", "dare_linear")  # these keep the `density` fraction of each task vector
DEFAULT_DENSITY = 0.5
INFERENCE_HOW = "cat"  # predict/serve's default: exactly the weighted sum of the updates (merge keeps peft's linear)
NOT_COMBINABLE_INITS = ("pissa", "olora")  # their base weights hold a residual of their own


def parse_combine(text: str) -> list[tuple[str, Path, float]]:
    """`a=runs/x:0.7,b=runs/y:0.3` -> [(name, run_dir, weight), ...]."""
    parts, problems = [], []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        name, eq, rest = item.partition("=")
        folder, colon, weight = rest.rpartition(":")
        value = _weight(weight)
        if not (eq and colon and name and folder) or value is None:
            problems.append(f"{item!r}: expected NAME=RUN_DIR:WEIGHT with a finite number as WEIGHT, "
                            f"e.g. seed1=runs/a/20261130-0800:0.5")
        else:
            parts.append((name, Path(folder), value))
    names = [p[0] for p in parts]
    if not problems and len(parts) < 2:
        problems.append("give at least two adapters (NAME=RUN_DIR:WEIGHT,NAME=RUN_DIR:WEIGHT)")
    if len(set(names)) != len(names):
        problems.append(f"names must differ: {', '.join(names)}")
    if not problems and sum(p[2] for p in parts) <= 0:
        problems.append("the weights must add up to more than 0 (the heads are averaged with them)")
    if problems:
        raise PeftFtError("--combine: " + "; ".join(problems))
    return parts


def parse_inference_combine(text: str, adapters: dict[str, str]) -> tuple[str, list[tuple[str, Path, float]]]:
    """`avg=s1:0.5,s2:0.5` (s1, s2 named by `--adapter`) -> ("avg", [(name, run_dir, weight), ...])."""
    name, eq, rest = text.partition("=")
    if not (eq and name and rest):
        raise PeftFtError(f"--combine {text}: expected NAME=ADAPTER:WEIGHT,ADAPTER:WEIGHT with ADAPTERs named by --adapter, "
                          f"e.g. avg=seed1:0.5,seed2:0.5")
    if name in adapters:
        raise PeftFtError(f"--combine {text}: {name!r} already names an --adapter; give the combination a name of its own")
    items = [s.strip() for s in rest.split(",") if s.strip()]
    unknown = [i.rpartition(":")[0] or i for i in items if (i.rpartition(":")[0] or i) not in adapters]
    if unknown:
        raise PeftFtError(f"--combine {text}: {', '.join(map(repr, unknown))} not given with --adapter (loaded: {', '.join(adapters)})")
    bad = [i for i in items if _weight(i.rpartition(":")[2]) is None or not i.rpartition(":")[0]]
    if bad:
        raise PeftFtError(f"--combine {text}: {', '.join(map(repr, bad))}: expected ADAPTER:WEIGHT with a finite number as WEIGHT, "
                          f"e.g. avg=seed1:0.5,seed2:0.5")
    try:
        parts = parse_combine(",".join(f"{a}={adapters[a]}:{w}" for a, _, w in (i.rpartition(":") for i in items)))
    except PeftFtError as e:  # fewer than two adapters, a name twice, weights adding up to 0
        said = str(e).removeprefix("--combine: ").replace("NAME=RUN_DIR:WEIGHT", "ADAPTER:WEIGHT")  # merge's syntax, not ours
        raise PeftFtError(f"--combine {text}: {said}") from None
    return name, parts


def _weight(text: str) -> float | None:
    """A combination weight, or None: NaN and infinity pass float() and every sum check (NaN <= 0 is False), and
    made a folder of NaN weights."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


Combination = tuple[str, list[tuple[str, Path, float]]]  # (name, [(adapter name, run folder, weight), ...])


def parse_inference_combinations(texts: list[str], adapters: dict[str, str], how: str, density: float | None) -> list[Combination]:
    """Every `--combine` of predict/serve parsed and its options checked, before anything loads."""
    if not texts and (how != INFERENCE_HOW or density is not None):
        raise PeftFtError("--how and --density apply to --combine NAME=ADAPTER:WEIGHT,...; give --combine or remove them")
    parsed = [parse_inference_combine(t, adapters) for t in texts]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise PeftFtError(f"--combine: each combination needs its own name: {', '.join(names)}")
    for _, parts in parsed:
        check_combinable(parts, how, density)
    return parsed


def build_inference_combinations(parsed: list[Combination], how: str, density: float | None, workdir: Path,
                                 allow_pickle: bool = False) -> dict[str, str]:
    """Each parsed `--combine` written as an adapter folder under `workdir` -> {name: folder}."""
    return {name: str(combine_runs(parts, how, workdir / name, density, allow_pickle)) for name, parts in parsed}


def check_combinable(parts: list[tuple[str, Path, float]], how: str, density: float | None) -> list[dict]:
    """Same base, same task, same labels (head shape), all LoRA: else one message naming each problem."""
    import json

    if how not in HOWS:
        raise PeftFtError(f"--how {how!r}: choose one of {', '.join(HOWS)}")
    if density is not None and how not in PRUNING:
        raise PeftFtError(f"--density applies to --how {', '.join(PRUNING)} (the fraction of each adapter's update kept); "
                          f"remove it for --how {how}")
    if density is not None and not 0 < density <= 1:
        raise PeftFtError(f"--density {density}: expected a fraction in (0, 1]")
    infos, problems = [], []
    for name, run_dir, _ in parts:
        info = read_info(run_dir)
        infos.append(info)
        config = json.loads((run_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")) if info["is_adapter"] else {}
        if info["method"] != "lora" or config.get("peft_type") != "LORA":
            problems.append(f"{name} ({run_dir}): method {info['method']!r}; only LoRA adapters combine (peft's weighted merging)")
        elif config.get("init_lora_weights") in NOT_COMBINABLE_INITS:
            problems.append(f"{name} ({run_dir}): a {config['init_lora_weights']} adapter changes its base's weights as it "
                            f"loads; adapters on different residual bases cannot be combined")
        elif config.get("use_dora"):
            problems.append(f"{name} ({run_dir}): DoRA adapters cannot be combined by peft's weighted merging")
    first = infos[0]
    for (name, run_dir, _), info in zip(parts[1:], infos[1:]):
        for key, what in (("base_model", "base model"), ("task", "task"), ("labels", "labels (head shape)")):
            if info[key] != first[key]:
                problems.append(f"{name} ({run_dir}): {what} {info[key]!r} differs from {parts[0][0]}'s {first[key]!r}")
    if problems:
        raise PeftFtError("--combine: these adapters cannot be combined: " + "; ".join(problems))
    return infos


def _split_state(run_dir: Path, heads: list[str]) -> tuple[dict, dict]:
    """(LoRA tensors, head tensors) of a saved adapter file, keys as peft saves them."""
    from safetensors.torch import load_file

    state = load_file(str(run_dir / ADAPTER_WEIGHTS))
    head = {k: v for k, v in state.items() if set(k.split(".")) & set(heads)}
    return {k: v for k, v in state.items() if k not in head}, head


def combine_runs(parts: list[tuple[str, Path, float]], how: str, out: str | Path, density: float | None = None,
                 allow_pickle: bool = False) -> Path:
    """Combine the LoRA adapters of `parts` into one adapter folder `out` (new or empty)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    out = Path(out)
    check_out(out)
    for name, run_dir, _ in parts:
        check_no_pickle(run_dir, f"--combine {name}: run folder", allow_pickle)
    infos = check_combinable(parts, how, density)
    first = infos[0]
    quiet_transformers()
    kwargs = {**TASKS[first["task"]].model_kwargs(TaskData(splits={}, labels=first["labels"])), **model_load_kwargs(allow_pickle)}
    cls = getattr(transformers, first["auto_class"])

    def base():
        return cls.from_pretrained(base_location(first), dtype=torch.float32, **kwargs)

    # 1. the LoRA parts alone (peft refuses to combine adapters that carry heads), combined by peft
    # Inside peft the parts are part0, part1...: a user's name such as "a" or "lora" lies inside peft's parameter
    # prefix "lora_", which peft warns may reinitialise the weights on loading.
    model, heads, weights, task_type, names = None, first["heads"], [w for _, _, w in parts], None, []
    for i, (_, run_dir, _) in enumerate(parts):
        config = LoraConfig.from_pretrained(str(run_dir))
        # no task type either: peft's task wrappers would add the head to modules_to_save by themselves; no base
        # name: the base loads from this machine's path, and peft would warn that the config's name was replaced
        task_type, config.task_type, config.modules_to_save, config.base_model_name_or_path = config.task_type, None, None, None
        lora_state, _ = _split_state(run_dir, heads)
        names.append(f"part{i}")
        if model is None:
            model = get_peft_model(base(), config, adapter_name=names[-1])
        else:
            model.add_adapter(names[-1], config)
        placed = set_peft_model_state_dict(model, lora_state, adapter_name=names[-1])
        if placed.unexpected_keys:  # as for the combined adapter below: a weight left at its initial value
            raise PeftFtError(f"--combine: internal error: weights of {run_dir} not placed: {', '.join(placed.unexpected_keys[:5])}")
    torch.manual_seed(0)  # DARE drops entries at random: the same command gives the same folder
    try:
        model.add_weighted_adapter(names, weights, "combined", combination_type=how,
                                   density=(density or DEFAULT_DENSITY) if how in PRUNING else None)
    except (ValueError, TypeError) as e:
        raise PeftFtError(f"--combine: peft cannot combine these adapters with --how {how}: {e}") from None
    combined_config = model.peft_config["combined"]
    combined_state = get_peft_model_state_dict(model, adapter_name="combined")

    # 2. the heads: weighted average of their weights
    head_states = [_split_state(run_dir, heads)[1] for _, run_dir, _ in parts]
    total = sum(weights)
    head_state = {k: sum(w * s[k] for w, s in zip(weights, head_states)) / total for k in head_states[0]}

    # 3. one fresh base + the combined adapter with its head, saved by peft like any trained run
    combined_config.modules_to_save, combined_config.task_type = list(heads) or None, task_type
    final = get_peft_model(base(), combined_config)
    result = set_peft_model_state_dict(final, {**combined_state, **head_state})
    if result.unexpected_keys:  # a key peft did not place would silently leave that weight untrained
        raise PeftFtError(f"--combine: internal error: weights not placed: {', '.join(result.unexpected_keys[:5])}")
    with staged(out, "combining") as staging:
        with deepspeed_unused():
            final.save_pretrained(staging)
        (staging / CARD).unlink(missing_ok=True)
        shutil.copyfile(parts[0][1] / RECIPE, staging / RECIPE)
        trainable = sum(p.numel() for n, p in final.named_parameters() if "lora_" in n or "modules_to_save" in n)
        total_params = sum(p.numel() for n, p in final.named_parameters() if "original_module" not in n)
        weight_bytes = (staging / ADAPTER_WEIGHTS).stat().st_size
        info = {**portable.moved_info(parts[0][1], out), "run_name": out.name, "data": {}, "train": {},
                # folder names, not this machine's paths: the combined folder travels without its sources
                "combined_from": [{"name": n, "run": d.resolve().name, "weight": w} for n, d, w in parts],
                "combination": {"how": how, "density": (density or DEFAULT_DENSITY) if how in PRUNING else None,
                                "heads": "weighted average of the heads' weights, sum(w_i * head_i) / sum(w_i)"},
                "trainable_params": trainable, "total_params": total_params, "trainable_percent": 100 * trainable / total_params,
                "weight_files": [ADAPTER_WEIGHTS], "weight_bytes": weight_bytes}
        write_json(staging / INFO, info)
        portable.finish_adapter_config(staging, info)  # the base by its portable name, as a trained run's
        portable.write_labels(staging, info["labels"])
        write_atomic(staging / CARD, _card(info, read_recipe(staging), out.name))
    return out


def _card(info: dict, recipe, folder: str) -> str:
    """README.md: what was combined how, and the run card's usage section (stock transformers + peft, labels.json)."""
    rows = "\n".join(f"| {c['name']} | `{c['run']}` | {c['weight']:g} |" for c in info["combined_from"])
    how = info["combination"]
    density = f", density {how['density']:g}" if how["density"] else ""
    base = info.get("base_model_id") or info["base_model"]  # a local base by its folder name, not this machine's path
    return (f"# {info['run_name']}\n\nLoRA adapters combined with peft-ft (`peft-ft merge --combine`, how `{how['how']}`"
            f"{density}); task `{info['task']}`, base "
            f"`{base}`. Heads: {how['heads']}.\n\n| adapter | run folder | weight |\n|---|---|---|\n{rows}\n\n"
            + "\n".join(usage_section(recipe, info, folder)) + "\n")
