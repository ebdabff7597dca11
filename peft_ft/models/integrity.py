"""Checks of a run, adapter or model folder before anything is loaded from it: is each file whole, and
does it describe what its tensors hold?

A folder may be damaged (a copy cut short, a full disk) or edited by hand or by someone hostile. The
libraries then fail late and loudly: safetensors with a `SafetensorError`, peft after building an
adapter of whatever rank `adapter_config.json` claims (an edited `"r": 20000` allocated 3.7 GB before
failing on the tensors' real rank 8). Everything here reads only JSON and the safetensors headers
(no torch), so a bad folder is refused in milliseconds, with the file named and what to do.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from peft_ft.errors import PeftFtError

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
# adapter_config.json fields that size what peft allocates: rank-like numbers, checked against the tensors.
RANK_FIELDS = ("r", "num_virtual_tokens")
# VeRA's `r` is the rank of its shared random projections, which may exceed the width (peft allows it).
UNBOUNDED_RANK = ("VERA",)
# OFT/BOFT size their blocks by oft_block_size / boft_block_size; their `r` (block count) may be 0, meaning "derived".
BLOCK_SIZED = ("OFT", "BOFT")
DAMAGED = "the folder is damaged or was edited: copy it again from its source, or train it again"


def check_regular(path: Path) -> None:
    """A file of a folder must be a plain file: reading a pipe waits forever, a link to /dev/zero fills the memory,
    and a folder of that name fails deep inside the loaders."""
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "a pipe, socket or device"
        raise PeftFtError(f"{path}: {kind}, not a file; {DAMAGED}")


def safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} of a safetensors file, read from its header only;
    a PeftFtError naming the file when it is empty, cut short, or not safetensors at all."""
    check_regular(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9:
            raise PeftFtError(f"{path}: not a safetensors file: {size} bytes, too short to hold a header; {DAMAGED}")
        (n,) = struct.unpack("<Q", head[:8])
        plausible = n <= min(MAX_HEADER, size - 8) and head[8:] == b"{"
        # A pickle (protocol 2+) starts with 0x80 and a torch.save zip with "PK"; so does a real header whose length
        # ends in 0x80 (1,920 bytes = 80 07 ...), hence the plausibility test first.
        if not plausible and head.startswith((b"\x80", b"PK")):
            raise PeftFtError(f"{path}: not a safetensors file: it is a pickle (torch.save) file renamed to .safetensors. "
                              f"Loading a pickle can run any code hidden in it; {DAMAGED}")
        if n > min(MAX_HEADER, size - 8):
            raise PeftFtError(f"{path}: not a safetensors file (its header claims {n} bytes, the file has {size}); {DAMAGED}")
        raw = head[8:] + f.read(n - 1) if n else b""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PeftFtError(f"{path}: not a safetensors file (its header is not JSON); {DAMAGED}") from None
    if not isinstance(header, dict):
        raise PeftFtError(f"{path}: not a safetensors file (its header is not a JSON object); {DAMAGED}")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise PeftFtError(f"{path}: tensor {name!r} has a malformed entry in the header; {DAMAGED}")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise PeftFtError(f"{path}: truncated or padded: its header describes {8 + n + end} bytes, the file has {size}; {DAMAGED}")
    return header


def check_weights(folder: Path) -> dict[str, dict]:
    """Every `*.safetensors` directly in `folder`, header-checked; returns all their tensor entries."""
    tensors: dict[str, dict] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(safetensors_header(path))
    return tensors


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object, or a PeftFtError naming it."""
    check_regular(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PeftFtError(f"{path}: missing; {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftFtError(f"{path}: unreadable ({e}); {DAMAGED}") from None
    if not isinstance(data, dict):
        raise PeftFtError(f"{path}: expected a JSON object, got {type(data).__name__}; {DAMAGED}")
    return data


def check_adapter(run_dir: Path, base_config: dict | None) -> None:
    """adapter_config.json against the adapter's own tensors and the base model, before peft allocates
    anything: each rank-like number must be what the tensors hold, and no larger than the base's width."""
    config_path = run_dir / "adapter_config.json"
    config = read_json_object(config_path, "an adapter run folder holds adapter_config.json beside its weights")
    tensors = check_weights(run_dir)
    if not tensors:
        raise PeftFtError(f"{run_dir}: no adapter weights (*.safetensors) beside adapter_config.json; {DAMAGED}")
    width = hidden_width(base_config or {})
    for key in RANK_FIELDS:
        value = config.get(key)
        if value is None or (key == "r" and config.get("peft_type") in BLOCK_SIZED):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PeftFtError(f"{config_path}: {key} must be a positive integer, got {value!r}; {DAMAGED}")
        if width and key == "r" and value > width and config.get("peft_type") not in UNBOUNDED_RANK:
            raise PeftFtError(f"{config_path}: r = {value} is larger than the base model's hidden size ({width}); a rank "
                              f"cannot exceed the layer it adapts; {DAMAGED}")
    held = _tensor_ranks(config, tensors)
    for key, (claimed, found) in held.items():
        if claimed not in found:
            raise PeftFtError(f"{config_path}: {key} = {claimed}, but the adapter's tensors hold {key} "
                              f"{', '.join(map(str, sorted(found)))}; the config and the weights do not belong together; {DAMAGED}")


def _tensor_ranks(config: dict, tensors: dict[str, dict]) -> dict[str, tuple[int, set[int]]]:
    """(claimed, found in tensors) per rank-like field: LoRA's r is lora_A's first dimension (rank_pattern
    and alpha_pattern aside), prompt methods' num_virtual_tokens the prompt table's first dimension."""
    out = {}
    r = config.get("r")
    lora_a = {entry["shape"][0] for name, entry in tensors.items() if ".lora_A." in name and entry["shape"]}
    if isinstance(r, int) and lora_a and not config.get("rank_pattern"):
        out["r"] = (r, lora_a)
    nv = config.get("num_virtual_tokens")
    prompts = {entry["shape"][0] for name, entry in tensors.items() if name.startswith("prompt_embeddings") and entry["shape"]}
    if isinstance(nv, int) and prompts:
        # prompt tables hold num_virtual_tokens * num_transformer_submodules rows (an encoder-decoder's prompt
        # goes to both halves); a prefix table holds num_virtual_tokens rows whatever the model
        per = 1 if config.get("peft_type") == "PREFIX_TUNING" else max(1, int(config.get("num_transformer_submodules") or 1))
        out["num_virtual_tokens"] = (nv, {rows // per for rows in prompts})
    return out


def hidden_width(config: dict) -> int | None:
    """The base's hidden size from its config.json (the names transformers' configs use)."""
    for key in ("hidden_size", "d_model", "dim", "n_embd"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def base_config(location: str) -> dict | None:
    """A local model folder's config.json (None for a hub id: transformers reads it when it loads)."""
    path = Path(location) / "config.json"
    return read_json_object(path, "a model folder holds config.json") if path.parent.is_dir() else None


def load_failure(error: Exception, run_dir: Path, base: str) -> PeftFtError:
    """What peft or safetensors raised while putting this folder's adapter on its base, as one message."""
    first = (str(error).splitlines()[0] if str(error) else type(error).__name__).rstrip(".")
    return PeftFtError(f"{run_dir}: the adapter (adapter_config.json, adapter_model.safetensors) does not load onto its base "
                       f"{base}: {first}. The adapter was trained on another model, or the folder was edited: point "
                       f"peft_ft.json's base_model at the model it was trained on, or copy the folder again")
