"""peft_ft.models.integrity on hand-made files: the header checks accept every real safetensors file and
the rank checks follow each method's meaning of `r`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_ft.errors import PeftFtError
from peft_ft.models.integrity import check_adapter, safetensors_header


def safetensors_with_header_length(path: Path, length: int) -> None:
    """A valid file holding one float32 tensor, its JSON header padded with spaces (allowed by the format) to `length`."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", length) + header.ljust(length) + struct.pack("<2f", 1.0, 2.0))


@pytest.mark.parametrize("length", [0x780, 0x280, 0x580, 0x4B50])  # first byte 0x80 like a pickle; 0x4B50 = "PK"
def test_a_header_whose_length_looks_like_a_pickle_or_zip_is_still_read(tmp_path, length):
    path = tmp_path / "adapter_model.safetensors"
    safetensors_with_header_length(path, length)
    assert path.read_bytes()[:2] in (b"\x80\x07", b"\x80\x02", b"\x80\x05", b"PK")
    assert safetensors_header(path)["w"]["shape"] == [2]
    assert load_file(str(path))["w"].tolist() == [1.0, 2.0]  # the library agrees it is a valid file


def test_a_torch_save_file_is_still_named_a_pickle(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(PeftFtError, match="pickle"):
        safetensors_header(path)


def test_an_empty_header_is_refused_not_read_to_the_end(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(struct.pack("<Q", 0) + b"{}")
    with pytest.raises(PeftFtError, match="not a safetensors file"):
        safetensors_header(path)


def adapter_folder(folder: Path, peft_type: str, r: int, tensors: dict) -> Path:
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": r}))
    return folder


def test_vera_rank_may_exceed_the_width_lora_rank_may_not(tmp_path):
    # VeRA's r is the rank of its shared random projections (peft's default 256 exceeds a 32-wide model)
    vera = adapter_folder(tmp_path / "vera", "VERA", 256,
                          {"base_model.model.x.vera_lambda_d.default": torch.zeros(32)})
    check_adapter(vera, {"hidden_size": 32})
    lora = adapter_folder(tmp_path / "lora", "LORA", 64,
                          {"base_model.model.x.lora_A.default.weight": torch.zeros(64, 32)})
    with pytest.raises(PeftFtError, match="r = 64 is larger than the base model's hidden size"):
        check_adapter(lora, {"hidden_size": 32})
