"""Every bad input through the CLI (`peft_ft.cli.main`): exit code 2, one message naming the file,
key or row and how to fix it, no traceback, and no run folder made (all are known before training)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import recipe_text, sentiment_rows, write_jsonl, write_recipe
from peft_ft.cli import main

# recipe_text keywords of a valid recipe per task (Case.recipe adds the model, data folder and output dir)
CLASSIFICATION = {"data": {"validation": "valid.jsonl"}, "train_opts": {"epochs": 1, "threads": 1}, "defaults": False,
                  "output": {"name": "r"}}
NER = {"task": {"type": "ner"}, "train": "train.txt", "train_opts": {"threads": 1}, "defaults": False}
QA = {"task": {"type": "qa"}, "train_opts": {"threads": 1}, "defaults": False}


class Case:
    """A folder with a valid classification setup, changed by each case; `argv` runs the CLI on it."""

    def __init__(self, tmp: Path, model: Path):
        self.tmp, self.model, self.data, self.out = tmp, model, tmp / "data", tmp / "runs"
        self.data.mkdir()
        write_jsonl(self.data / "train.jsonl", sentiment_rows(8, seed=1))
        write_jsonl(self.data / "valid.jsonl", sentiment_rows(4, seed=2))

    def recipe(self, template: dict = CLASSIFICATION, extra: str = "", model: Path | str | None = None) -> str:
        """The valid recipe, then `extra` as literal TOML text (the broken part of a case)."""
        sections = {**template, "output": {"dir": self.out, **template.get("output", {})}}
        text = recipe_text(model if model is not None else self.model, self.data, **sections) + extra
        return str(write_recipe(self.tmp / "recipe.toml", text))


def unknown_key(c):
    return ["run", c.recipe(), "--set", "train.lrr=0.1"], ["--set train.lrr=0.1: unknown key (did you mean `lr`?)"]


def unknown_section(c):
    return ["run", c.recipe(extra="[trainer]\nlr = 1\n")], ["recipe.toml", "[trainer]: unknown section (did you mean `train`?)"]


def wrong_type(c):
    return ["run", c.recipe(extra='[eval]\nbatch_size = "fast"\n')], ["recipe.toml", "eval.batch_size: expected an integer, got \"fast\""]


def negative_lr(c):
    return ["run", c.recipe(), "--set", "train.lr=-0.001"], ["--set train.lr=-0.001: must be at least 0.0, got -0.001"]


def zero_rank(c):
    return ["run", c.recipe(), "--set", "adapter.r=0"], ["--set adapter.r=0: must be at least 1, got 0"]


def recipe_not_utf8(c):
    path = c.tmp / "latin1.toml"
    path.write_bytes('[output]\nname = "caf\xe9"\n'.encode("latin-1"))
    return ["run", str(path)], ["latin1.toml", "not UTF-8", "save the recipe as UTF-8"]


def missing_data_file(c):
    return ["run", c.recipe(), "--set", "data.train=nope.jsonl"], ["data.train: file not found", "nope.jsonl", "Files there: train.jsonl, valid.jsonl"]


def missing_split(c):
    return ["run", c.recipe(), "--set", "data.test=['test.jsonl']"], ["data.test[0]: file not found", "test.jsonl", "Fix the name or data.dir"]


def no_train_split(c):
    return ["run", c.recipe(), "--set", 'data.train=""'], ["--set data.train=\"\": required"]


def data_dir_missing(c):
    return ["run", c.recipe(), "--data-dir", str(c.tmp / "nodata")], ["data directory not found", "nodata", "--data-dir"]


def csv_missing_column(c):
    (c.data / "train.csv").write_text("sentence,label\ngood movie,pos\nbad film,neg\n", encoding="utf-8")
    return ["run", c.recipe(), "--set", "data.train=train.csv"], ["train.csv: missing column(s) data.text_column = 'text'", "the file has: sentence, label"]


def parquet_missing_column(c):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["good", "bad"], "gold": ["pos", "neg"]}), c.data / "train.parquet")
    return ["run", c.recipe(), "--set", "data.train=train.parquet"], ["train.parquet: missing column(s) data.label_column = 'label'"]


def empty_split(c):
    (c.data / "valid.jsonl").write_text("\n", encoding="utf-8")
    return ["run", c.recipe()], ["valid.jsonl: the split is empty"]


def unseen_eval_label(c):
    write_jsonl(c.data / "valid.jsonl", [{"text": "good", "label": "pos"}, {"text": "meh", "label": "neutral"}])
    return ["run", c.recipe()], ["valid.jsonl: row 2: label 'neutral' is not among the training labels (neg, pos)", "task.labels"]


def data_not_utf8(c):
    (c.data / "train.jsonl").write_bytes(b'{"text": "good", "label": "pos"}\n{"text": "caf\xe9", "label": "neg"}\n')
    return ["run", c.recipe()], ["train.jsonl: line 2: not UTF-8", "re-save the file as UTF-8"]


def bad_jsonl_line(c):
    (c.data / "train.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", \n', encoding="utf-8")
    return ["run", c.recipe()], ["train.jsonl: line 2: not valid JSON"]


def conll_wrong_columns(c):
    (c.data / "train.txt").write_text("John B-PER\nlives O\nin O O\nParis B-LOC\n", encoding="utf-8")
    return ["run", c.recipe(NER)], ["train.txt: line 3: 3 column(s) where the file's first line has 2", "data.separator"]


def squad_answer_start(c):
    row = {"id": "q7", "question": "who lives in paris?", "context": "john lives in paris",
           "answers": {"text": ["john"], "answer_start": [3]}}
    write_jsonl(c.data / "train.jsonl", [row])
    return ["run", c.recipe(QA)], ["train.jsonl: question q7: answer_start 3 does not match the answer text 'john'",
                                   "the text occurs at 0", "fix answer_start"]


def model_without_weights(c):
    folder = c.tmp / "noweights"
    shutil.copytree(c.model, folder)
    (folder / "model.safetensors").unlink()
    return ["run", c.recipe(model=folder)], ["model.name:", "noweights is not a complete model folder: missing weights"]


def model_without_tokenizer(c):
    folder = c.tmp / "notokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(c.model / name, folder / name)
    return ["run", c.recipe(model=folder)], ["model.name:", "missing tokenizer files", "it holds: config.json, model.safetensors"]


def model_path_missing(c):
    return ["run", c.recipe(model=c.tmp / "nomodel")], ["recipe.toml: model.name: no model folder at", "nomodel"]


def hub_id_offline(c):
    return ["run", c.recipe(model="peft-ft-test/no-such-model")], [
        "recipe.toml: model.name: 'peft-ft-test/no-such-model' is a hub id, the hub cannot be reached", "local model folder"]


def _model_copy(c, name: str, **config_changes) -> Path:
    """A copy of the tiny BERT whose config.json is changed (a key set to None is removed)."""
    import json

    folder = c.tmp / name
    shutil.copytree(c.model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


def model_config_without_type(c):
    # a named target needs the skeleton: its config load raised transformers' ValueError as a traceback
    folder = _model_copy(c, "notype", model_type=None)
    return ["validate", c.recipe(model=folder), "--set", 'adapter.target_modules=["query"]'], [
        "model.name: cannot load the config", "Should have a `model_type` key"]


def model_with_custom_code(c):
    folder = _model_copy(c, "custom", model_type="xbert", auto_map={"AutoConfig": "configuration_x.XConfig"})
    (folder / "configuration_x.py").write_text("raise SystemExit('custom code ran')\n")
    return ["validate", c.recipe(model=folder)], ["the model needs Python code shipped with it", "model.trust_remote_code = true"]


def model_path_a_link_loop(c):
    (c.tmp / "loop").symlink_to(c.tmp / "loop")  # resolving it for the message raised RuntimeError
    return ["validate", c.recipe(model=c.tmp / "loop")], ["model.name: a symbolic link that leads to no folder at", "loop"]


def model_tokenizer_not_json(c):
    folder = _model_copy(c, "badtok")
    (folder / "tokenizer.json").write_text("{not json")  # validate passed it; run crashed, leaving a run folder
    return ["validate", c.recipe(model=folder)], ["tokenizer.json is not valid JSON (line 1", "copy the model folder again"]


def cuda_on_cpu(c):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return ["run", c.recipe(), "--set", "train.device=cuda"], ["recipe.toml: train.device: \"cuda\" asked for, but torch sees no CUDA GPU"]


def output_dir_is_a_file(c):
    c.out.write_text("not a folder")
    return ["run", c.recipe()], ["output.dir", "runs", "is a file"]


def output_dir_is_a_link_loop(c):
    c.out.symlink_to(c.out)  # validate passed it; run then failed making the folder
    return ["validate", c.recipe()], ["output.dir", "is a symbolic link that leads nowhere"]


def validate_command_too(c):
    return ["validate", c.recipe(), "--set", "data.train=nope.jsonl"], ["data.train: file not found"]


CASES = [
    unknown_key, unknown_section, wrong_type, negative_lr, zero_rank, recipe_not_utf8,
    missing_data_file, missing_split, no_train_split, data_dir_missing,
    csv_missing_column, parquet_missing_column, empty_split, unseen_eval_label, data_not_utf8, bad_jsonl_line,
    conll_wrong_columns, squad_answer_start,
    model_without_weights, model_without_tokenizer, model_path_missing, hub_id_offline,
    model_config_without_type, model_with_custom_code, model_path_a_link_loop, model_tokenizer_not_json,
    cuda_on_cpu, output_dir_is_a_file, output_dir_is_a_link_loop, validate_command_too,
]


@pytest.mark.parametrize("case", CASES, ids=[f.__name__ for f in CASES])
def test_bad_input_gives_one_clear_error(case, tmp_path, tiny_bert, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PEFT_FT_DATA_DIR", raising=False)
    c = Case(tmp_path, tiny_bert)
    c.monkeypatch = monkeypatch
    argv, expected = case(c)
    before = sorted(p.name for p in c.out.rglob("*")) if c.out.is_dir() else None
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for piece in expected:
        assert piece in err, f"{piece!r} not in {err!r}"
    after = sorted(p.name for p in c.out.rglob("*")) if c.out.is_dir() else None
    assert after == before  # nothing was created: every case is caught before the run folder is made


def test_debug_shows_the_traceback(tmp_path, tiny_bert):
    c = Case(tmp_path, tiny_bert)
    from peft_ft.errors import DataError

    with pytest.raises(DataError, match="data.train: file not found"):
        main(["--debug", "run", c.recipe(), "--set", "data.train=nope.jsonl"])
    with pytest.raises(DataError, match="data.train: file not found"):  # after the command, where users put it
        main(["run", c.recipe(), "--set", "data.train=nope.jsonl", "--debug"])
    assert main(["run", c.recipe(), "--set", "data.train=nope.jsonl"]) == 2  # and off without it


def test_error_exits_non_zero_from_the_console_script(tmp_path):
    import subprocess
    import sys

    recipe = write_recipe(tmp_path / "r.toml", "[train]\nlr = -1\n")
    done = subprocess.run([sys.executable, "-m", "peft_ft", "validate", str(recipe)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "train.lr: must be at least 0.0" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_output_into_a_closed_pipe_is_no_error():
    """`peft-ft explain | head -1`: the reader goes away before we finish writing; no traceback, exit 0."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "peft_ft", "explain"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before the first write: every write meets a broken pipe
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


@pytest.mark.parametrize("argv, says", [
    (["predict", "--adapter", "a=x", "--batch-size", "0"], "argument --batch-size: 0: give 1 or more"),
    (["serve", "--adapter", "a=x", "--max-texts", "-1"], "argument --max-texts: -1: give 1 or more"),
    (["serve", "--adapter", "a=x", "--request-timeout", "nan"], "argument --request-timeout: nan: give a finite number above 0"),
    (["serve", "--adapter", "a=x", "--max-wait-ms", "-5"], "argument --max-wait-ms: -5: give a finite number of at least 0"),
    (["export", "x", "--onnx", "o", "--tolerance", "inf"], "argument --tolerance: inf: give a finite number above 0"),
])
def test_numeric_options_out_of_range_are_refused_by_the_parser(argv, says, capsys):
    """A NaN --request-timeout crashed serve's start with a traceback; --batch-size 0, --max-texts -1 and a negative
    --max-wait-ms were taken silently."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("name", ["x=y", "my model", "org/", "a" * 100])
def test_a_model_name_that_is_no_folder_nor_hub_id_is_one_message(name):
    """huggingface_hub's own id check raised HFValidationError from inside the cache lookup: a traceback, exit 1."""
    from peft_ft.errors import PeftFtError
    from peft_ft.models.loading import resolve_model
    from peft_ft.recipe.load import build_recipe

    with pytest.raises(PeftFtError, match=r"r\.toml: model\.name: .* is neither a model folder nor a valid hub id"):
        resolve_model(build_recipe({"model": {"name": name}, "data": {"train": "t.jsonl"}}, "r.toml"))


def test_a_recipe_path_that_is_a_folder_says_so(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 2
    assert "is a folder, not a recipe file" in capsys.readouterr().err


def test_offline_is_read_as_huggingface_hub_reads_it(monkeypatch):
    """HF_HUB_OFFLINE=ON (or TRANSFORMERS_OFFLINE=1) keeps the hub libraries offline; peft-ft read only 1/true/yes,
    took the hub for reachable and let transformers' connection error end in a traceback."""
    from peft_ft.models.loading import hub_offline

    for env, offline in (({"HF_HUB_OFFLINE": "ON"}, True), ({"TRANSFORMERS_OFFLINE": "1"}, True), ({"HF_HUB_OFFLINE": "yes"}, True),
                         ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, False), ({}, False)):
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert hub_offline() is offline, env


@pytest.fixture
def fake_hub():
    """A local HTTP server answering 404 Repository Not Found to everything, as the hub does for a misspelt id."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body = b'{"error": "Repository Not Found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_hub_probe_asks_the_endpoints_own_port_over_its_own_scheme(fake_hub, monkeypatch):
    """A mirror at http://host:PORT was probed on port 443 (declared unreachable, never asked); an endpoint that accepts
    TCP but fails TLS was declared reachable, and the hub libraries then retried for ~30 s."""
    from peft_ft.models.loading import hub_reachable

    monkeypatch.setenv("HF_ENDPOINT", f"http://{fake_hub}")
    assert hub_reachable.__wrapped__(timeout=5)  # a 404 is an answer
    monkeypatch.setenv("HF_ENDPOINT", f"https://{fake_hub}")  # plain HTTP behind https://: the TLS handshake fails
    assert not hub_reachable.__wrapped__(timeout=5)


def test_a_misspelt_hub_id_with_the_hub_reachable_is_one_message(fake_hub, tmp_path, tiny_bert):
    """Named targets build the skeleton, whose config load bypassed the message: transformers' OSError traceback."""
    import os
    import subprocess
    import sys

    c = Case(tmp_path, tiny_bert)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))},
           "HF_ENDPOINT": f"http://{fake_hub}", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "peft_ft", "validate", c.recipe(model="peft-ft-test/no-such-modle"),
                           "--set", 'adapter.target_modules=["query"]'], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "model.name: cannot load the config 'peft-ft-test/no-such-modle'" in done.stderr


def test_a_run_on_a_pinned_hub_revision_finds_its_base_offline_at_that_revision(tmp_path, monkeypatch):
    """A base downloaded at a commit has no refs/main in the cache: predict and merge looked for `main` and said the
    base was not cached, on the machine that had just trained on it."""
    from huggingface_hub import constants

    from peft_ft.errors import PeftFtError
    from peft_ft.rundir.load import base_location

    commit = "1" * 40
    snapshot = tmp_path / "hub" / "models--org--pinned" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = {"base_model": "org/pinned", "base_model_source": "hub", "base_model_revision": commit}
    # a config without weights (an interrupted download, or pytorch_model.bin only) was taken for a cached model
    (snapshot / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(PeftFtError, match=f"'org/pinned' at revision '{commit}' is in the local cache .* without safetensors"):
        base_location(info)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    assert base_location(info) == "org/pinned"
    with pytest.raises(PeftFtError, match="'org/pinned' is a hub id, .* the model is not in the local cache"):
        base_location({**info, "base_model_revision": ""})


def test_a_config_that_contradicts_the_backbone_weights_is_refused_not_trained_on(tmp_path, tiny_bert, capsys):
    """An edited vocab_size: ignore_mismatched_sizes (meant for heads) made the word embeddings fresh and random, and
    the run trained them as a "head" and finished with exit 0."""
    import json

    c = Case(tmp_path, tiny_bert)
    vocab = json.loads((tiny_bert / "config.json").read_text())["vocab_size"]
    folder = _model_copy(c, "edited", vocab_size=vocab + 7)
    assert main(["run", c.recipe(model=folder)]) == 2
    err = capsys.readouterr().err
    assert "config.json does not fit the weights: bert.embeddings.word_embeddings.weight is [" in err, err
    assert "replaced by a random one" in err and "Traceback" not in err
    assert not list(c.out.rglob("*.json"))  # no run folder left behind


def test_a_hub_base_missing_offline_says_how_to_get_it_and_a_local_copy_named_in_base_model_loads(tmp_path, monkeypatch, tiny_bert):
    """The embedded MiniLM's hub id offline: register-embedded was never suggested; pointing base_model at a local copy
    was refused as "neither a model folder nor a valid hub id" unless base_model_source was changed as well."""
    from huggingface_hub import constants

    from peft_ft.errors import PeftFtError
    from peft_ft.models.hub_cache import EMBEDDED_HUB_ID
    from peft_ft.rundir.load import base_location

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PeftFtError, match="run `peft-ft register-embedded`"):
        base_location({"base_model": EMBEDDED_HUB_ID, "base_model_source": "hub"}, "run1: base model")
    with pytest.raises(PeftFtError, match="set peft_ft.json's base_model to the path of a local copy"):
        base_location({"base_model": "org/other", "base_model_source": "hub"})
    assert base_location({"base_model": str(tiny_bert), "base_model_source": "hub"}) == str(tiny_bert)
