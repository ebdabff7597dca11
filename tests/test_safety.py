"""Loading without pickle: run, adapter and model folders holding pickle files are refused unless allowed."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TEXTS, recipe_text, reference, train_sentiment
from peft_ft.errors import PeftFtError
from peft_ft.models.safety import check_no_pickle, pickle_files, remote_code


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bert) -> Path:
    return train_sentiment(tmp_path_factory.mktemp("safety"), tiny_bert, "pos")


def with_pickle(run_dir: Path, tmp_path: Path, name: str = "extra.pt") -> Path:
    """A copy of a run folder with one pickle file dropped in, beside the original: the run's local base
    folder is recorded relative to the run folder (peft_ft.rundir.portable), so the copy keeps the same depth."""
    copy = shutil.copytree(run_dir, run_dir.parent / f"{tmp_path.name}-tainted")
    (copy / name).write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1: never unpickled by the check
    return copy


def test_a_run_folder_written_by_peft_ft_has_no_pickle(run_dir):
    assert pickle_files(run_dir) == []
    assert any(p.suffix == ".safetensors" for p in run_dir.iterdir())


@pytest.mark.parametrize("name", ["adapter_model.bin", "extra.pt", "w.pth", "x.pkl", "last.ckpt"])
def test_check_names_the_file_and_the_flag(tmp_path, name, caplog):
    (tmp_path / name).write_bytes(b"x")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(PeftFtError, match=rf"refused: it holds pickle file\(s\) {re.escape(name)}\. Loading a pickle can run any code.*--allow-pickle"):
        check_no_pickle(tmp_path, "run folder")
    with caplog.at_level(logging.WARNING, logger="peft_ft"):
        check_no_pickle(tmp_path, "run folder", allow_pickle=True)
    assert name in caplog.text and "--allow-pickle" in caplog.text


def test_every_loader_refuses_a_pickle_in_an_adapter_folder_unless_allowed(run_dir, tmp_path):
    from peft_ft.rundir.load import load_run
    from peft_ft.serving.merge import merge_run
    from peft_ft.serving.pipelines import pipeline
    from peft_ft.serving.predict import AdapterSet

    tainted = with_pickle(run_dir, tmp_path)
    for load in (lambda: AdapterSet({"pos": tainted}), lambda: load_run(tainted), lambda: pipeline(tainted),
                 lambda: merge_run(tainted, tmp_path / "merged")):
        with pytest.raises(PeftFtError, match=r"tainted: refused: it holds pickle file\(s\) extra\.pt"):
            load()
    assert not (tmp_path / "merged").exists()
    # allowed explicitly: the same answers as the clean folder (the extra file is never read)
    answers = AdapterSet({"pos": tainted}, allow_pickle=True).answer("pos", [{"text": t} for t in TEXTS])
    assert [a["label"] for a in answers] == [r["label"] for r in reference(run_dir, TEXTS)]


def test_cli_predict_and_merge_refuse_then_take_allow_pickle(run_dir, tmp_path, capsys):
    from peft_ft.cli import main

    tainted = with_pickle(run_dir, tmp_path, "adapter_model.bin")
    inputs = tmp_path / "in.txt"
    inputs.write_text("good film\n")
    assert main(["predict", "--adapter", f"pos={tainted}", str(inputs)]) == 2
    assert "adapter_model.bin" in capsys.readouterr().err
    assert main(["merge", str(tainted), "--out", str(tmp_path / "m")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["predict", "--adapter", f"pos={tainted}", "--allow-pickle", str(inputs)]) == 0
    assert '"label"' in capsys.readouterr().out


def test_a_local_model_folder_with_only_pickle_weights_is_refused(tiny_bert, tmp_path):
    from peft_ft.models.loading import check_model_folder

    folder = shutil.copytree(tiny_bert, tmp_path / "old-model")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(PeftFtError, match=r"model.name: model folder .*old-model: refused: it holds pickle file\(s\) pytorch_model\.bin"):
        check_model_folder(folder)
    check_model_folder(folder, allow_pickle=True)
    # a recipe's model.name: `run` and `validate` have no --allow-pickle, so the message does not offer it
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nname = "{folder}"\n[data]\ntrain = "t.jsonl"\n')
    done = subprocess.run([sys.executable, "-m", "peft_ft", "validate", str(recipe)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "r.toml: model.name: model folder" in done.stderr, done.stderr
    assert "--allow-pickle" not in done.stderr and ".save_pretrained(NEW_FOLDER) writes model.safetensors" in done.stderr
    # safetensors beside the pickle: loaders pass use_safetensors=True, so the pickle is never read
    shutil.copyfile(tiny_bert / "model.safetensors", folder / "model.safetensors")
    check_model_folder(folder)


def test_training_does_not_fall_back_to_pickle_weights(tiny_bert, tmp_path):
    """load_model passes use_safetensors=True: a folder whose only weights are a .bin fails to load even
    when the folder check is bypassed."""
    from peft_ft.models.loading import load_model
    from peft_ft.recipe.load import load_recipe

    folder = shutil.copytree(tiny_bert, tmp_path / "old-model")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(recipe_text(folder, train="x.jsonl", defaults=False))
    with pytest.raises((PeftFtError, OSError)):
        load_model(str(folder), load_recipe(recipe_file), "AutoModelForSequenceClassification", num_labels=2)


def test_every_model_load_fetches_no_hub_kernels(run_dir, tiny_bert, tmp_path, monkeypatch):
    """transformers 5.25 turns `use_kernels` on by default (kernels fetched from the Hub replace layers such as GELU
    on a GPU); training, reloading a run and combining adapters all ask for it off (safety.model_load_kwargs)."""
    import transformers

    from peft_ft.models.loading import load_model
    from peft_ft.recipe.load import load_recipe
    from peft_ft.rundir.load import load_run
    from peft_ft.serving.combine import combine_runs

    original = transformers.PreTrainedModel.from_pretrained.__func__
    asked = []

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("use_kernels", "not passed"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(spy))
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(recipe_text(tiny_bert, train="x.jsonl", defaults=False))
    load_model(str(tiny_bert), load_recipe(recipe_file), "AutoModelForSequenceClassification", num_labels=2)
    load_run(run_dir)
    combine_runs([("a", run_dir, 0.5), ("b", run_dir, 0.5)], "linear", tmp_path / "combined")
    assert len(asked) >= 3 and set(asked) == {False}, asked


def test_trust_remote_code_is_off_by_default_and_warned_when_on(tmp_path, caplog):
    from peft_ft.recipe.load import load_recipe

    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text('[data]\ntrain = "x.jsonl"\n')
    with caplog.at_level(logging.WARNING, logger="peft_ft"):
        assert remote_code(load_recipe(recipe_file)).model.trust_remote_code is False
        assert caplog.text == ""
        assert remote_code(load_recipe(recipe_file, ["model.trust_remote_code=true"])).model.trust_remote_code is True
    assert "remote code is on" in caplog.text


def test_no_torch_load_without_weights_only_in_the_package():
    root = Path(__file__).resolve().parents[1] / "peft_ft"
    calls = [(p.name, line.strip()) for p in root.rglob("*.py") for line in p.read_text(encoding="utf-8").splitlines() if "torch.load(" in line]
    assert all("weights_only=True" in line for _, line in calls), calls
