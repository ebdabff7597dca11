"""The recipe schema: every error kind, reported together, with file and dotted key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from peft_ft.errors import PeftFtError, RecipeError
from peft_ft.recipe.dump import to_toml
from peft_ft.recipe.explain import explain
from peft_ft.recipe.load import load_recipe, parse_override
from peft_ft.recipe.schema import section_types

GOOD = """
[task]
type = "classification"
[data]
train = "train.jsonl"
"""


def problems_of(tmp_path, text: str, overrides=()) -> list[str]:
    path = tmp_path / "r.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    # each line names the file, or the `--set key=value` it came from
    assert all(line.strip().startswith((str(path), "--set ")) for line in str(info.value).splitlines()[1:]), str(info.value)
    return info.value.problems


def test_defaults_fill_a_minimal_recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(GOOD)
    recipe = load_recipe(path)
    assert recipe.adapter.method == "lora" and recipe.train.batch_size == 32
    assert recipe.explicit == {"task.type", "data.train"}


def test_three_mistakes_give_three_errors_in_one_message(tmp_path):
    text = GOOD + '[train]\nlr = "fast"\nepocs = 3\n[adapter]\nr = 0\n'
    problems = problems_of(tmp_path, text)
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert 'train.lr: expected a number, got "fast"' in joined
    assert "train.epocs: unknown key (did you mean `epochs`?)" in joined
    assert "adapter.r: must be at least 1, got 0" in joined


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("[train]\nbatch_size = 3.5\n", "train.batch_size: expected an integer, got 3.5"),
        ("[train]\nbatch_size = \"32\"\n", 'train.batch_size: expected an integer, got "32"'),
        ("[train]\ngroup_by_length = 1\n", "train.group_by_length: expected true or false, got 1"),
        ("[train]\nlr = -0.1\n", "train.lr: must be at least 0.0, got -0.1"),
        ("[train]\nwarmup = 1.0\n", "train.warmup: must be below 1.0, got 1.0"),
        ("[train]\ndevice = \"gpu\"\n", "train.device: expected one of 'auto', 'cpu', 'cuda', got 'gpu'"),
        ("[adapter]\nbias = \"nonee\"\n", "(did you mean 'none'?)"),
        ("[adapter]\ntarget_modules = \"query\"\n", "adapter.target_modules: expected a list of strings"),
        ("[modle]\nname = \"x\"\n", "[modle]: unknown section (did you mean `model`?)"),
        ("[task]\nlabel_all_subwords = true\n", "task.label_all_subwords: applies only when task.type is 'ner'"),
        ("[adapter]\nmethod = \"loar\"\n", "adapter.method: unknown value 'loar' (did you mean 'lora'?)"),
        ("[eval]\nmetric = \"f2\"\n", "eval.metric: unknown value 'f2'"),
        ("[data]\nvalidation = \"v.jsonl\"\nvalidation_fraction = 0.1\n", "set either data.validation or data.validation_fraction"),
    ],
)
def test_each_error_kind_names_its_key(tmp_path, snippet, expected):
    # GOOD already has [task] and [data]: merge by writing the snippet's keys under a fresh recipe.
    text = snippet if snippet.startswith(("[task]", "[data]")) else GOOD + snippet
    if snippet.startswith("[task]"):
        text = snippet + '[data]\ntrain = "t.jsonl"\n'
    if snippet.startswith("[data]"):
        text = snippet + 'train = "t.jsonl"\n'
    problems = problems_of(tmp_path, text)
    assert any(expected in p for p in problems), problems


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(GOOD + "[train]\nlr = 1\n")
    assert load_recipe(path).train.lr == 1.0


def test_toml_syntax_error_names_the_file(tmp_path):
    problems = problems_of(tmp_path, "[train\nlr = 1")
    assert "not valid TOML" in problems[0]


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_overrides_are_validated_like_the_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(GOOD)
    recipe = load_recipe(path, ["train.lr=3e-4", "model.name=some-model", "data.test=['a.jsonl', 'b.jsonl']"])
    assert recipe.train.lr == 3e-4 and recipe.model.name == "some-model" and recipe.data.test == ["a.jsonl", "b.jsonl"]
    assert "train.lr" in recipe.explicit
    problems = problems_of(tmp_path, GOOD, ["train.lr=fast", "train.nope=1", "adapter.r=-1"])
    assert len(problems) == 3
    assert any("--set train.nope=1: unknown key" in p for p in problems)


def test_override_without_equals_sign():
    with pytest.raises(RecipeError, match="expected key=value"):
        parse_override("train.lr")


def test_explain_lists_every_field_with_type_default_and_help():
    text = explain()
    for name, cls in section_types().items():
        assert f"[{name}]" in text
        for f in dataclasses.fields(cls):
            assert f"  {f.name} : " in text
            assert f.metadata["help"] in text
    assert "lr : float = 0.0" in explain("train")
    with pytest.raises(PeftFtError, match="did you mean `train`"):
        explain("trian")


def test_resolved_recipe_round_trips(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(GOOD + "[train]\nlr = 3e-4\n")
    recipe = load_recipe(path)
    again = tmp_path / "again.toml"
    again.write_text(to_toml(recipe))
    assert load_recipe(again).to_dict() == recipe.to_dict()


def test_cli_help_validate_and_explain_do_not_import_torch(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(GOOD + "[train]\nlr = \"fast\"\n")
    code = (
        "import sys; from peft_ft.cli import main\n"
        f"main(['explain']); rc = main(['validate', {str(path)!r}])\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy, 'RC', rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY [] RC 2" in out.stdout, out.stdout + out.stderr
    assert "train.lr: expected a number" in out.stderr
    assert "Traceback" not in out.stderr


def test_set_problems_name_what_was_typed_and_values_read_as_the_field_wants(tmp_path):
    problems = problems_of(tmp_path, GOOD, ["train.lr=fast", "lr=1e-4", "learning_rate=1e-4", "Train.lr=1",
                                            "train.max_length=64", "output.name=a/b", "train.seed=99999999999"])
    assert "--set train.lr=fast: expected a number, got \"fast\"" in problems
    assert "--set lr=1e-4: expected section.key, for example train.lr (did you mean `train.lr`?)" in problems
    assert "--set learning_rate=1e-4: expected section.key, for example train.lr (did you mean `train.lr`?)" in problems
    assert "--set Train.lr=1: unknown section (did you mean `train`?)" in problems
    assert "--set train.max_length=64: unknown key (did you mean `model.max_length`?)" in problems
    assert any(p.startswith("--set output.name=a/b: 'a/b' is not a plain folder name") for p in problems), problems
    assert "--set train.seed=99999999999: must be at most 4294967295, got 99999999999" in problems
    path = tmp_path / "r.toml"
    recipe = load_recipe(path, ["output.name=2024", "data.test=a.jsonl, b.jsonl", "train.fast_kernels=False", "model.revision=7"])
    assert recipe.output.name == "2024" and recipe.model.revision == "7"  # strings, as the fields want
    assert recipe.data.test == ["a.jsonl", "b.jsonl"] and recipe.train.fast_kernels is False
    assert load_recipe(path, ["data.test="]).data.test == []  # the empty list clears a list key
    quoted = load_recipe(path, ['data.test=a.jsonl,"b c.jsonl", \'d.jsonl\'']).data.test
    assert quoted == ["a.jsonl", "b c.jsonl", "d.jsonl"]  # quotes around an item are the shell user's, not the name's


def test_a_key_set_twice_with_two_values_is_refused_naming_both(tmp_path):
    problems = problems_of(tmp_path, GOOD, ["train.lr=1e-3", "train.lr=1e-4"])
    assert "--set train.lr=1e-3 and --set train.lr=1e-4: two values for train.lr; give it once" in problems
    assert load_recipe(tmp_path / "r.toml", ["train.lr=1e-3", "train.lr=1e-3"]).train.lr == 1e-3  # the same twice is one


@pytest.mark.parametrize("text", ["a\nb", "tab\there", "\x00\x1f\x7f", "cr\r\n", "sep\u2028\u2029\x85", 'q"\\', "plain é 日本"])
def test_every_text_value_round_trips_through_the_written_recipe(text):
    """recipe.toml is written after training: a newline in output.dir or a data file name made it invalid TOML
    there (a traceback after the whole run, and a folder no loader could read)."""
    import tomllib

    from peft_ft.recipe.dump import toml_value

    line = f"v = {toml_value(text)}"
    assert len(line.splitlines()) == 1 and tomllib.loads(line)["v"] == text


def test_names_that_are_not_utf8_are_refused_before_a_run_starts(tmp_path):
    problems = problems_of(tmp_path, GOOD, ["output.dir=/tmp/runs\udcff"])
    assert any("--set output.dir=/tmp/runs\udcff: '/tmp/runs\\\\xff' holds bytes that are not UTF-8" in p for p in problems), problems
    recipe = tmp_path / "bad\udcffname.toml"
    recipe.write_text(GOOD, encoding="utf-8")
    with pytest.raises(RecipeError, match="named after the recipe file, whose name holds bytes that are not UTF-8"):
        load_recipe(recipe)
    assert load_recipe(recipe, ["output.name=fine"]).output.name == "fine"


def test_keys_outside_sections_and_names_from_transformers_point_home(tmp_path):
    problems = problems_of(tmp_path, "lr = 1e-4\n" + GOOD + "[adapter]\nlora_alpha = 16\n[Output]\nname = 'x'\n")
    assert "lr: a key outside any section (did you mean `train.lr`? Write it under [train])" in problems
    assert "adapter.lora_alpha: unknown key (did you mean `adapter.alpha`?)" in problems
    assert "[Output]: unknown section (did you mean `output`?)" in problems


@pytest.mark.parametrize("extra, expected", [
    ("[task]\nlabels = ['a', 'b', 'a']", "task.labels: 'a' listed twice"),
    ("[data]\ntest = ['t.jsonl', '']", "data.test: an empty item"),
    ("[output]\nname = '..'", "output.name: '..' is not a plain folder name"),
    ("[output]\nname = 'x\\\\y'", "is not a plain folder name"),
    ("[output]\ndir = ''", "output.dir: empty"),
    ("[train]\nthreads = 5000", "train.threads: must be at most 1024"),
    ("[train]\nlr = 3e4", "train.lr: must be at most 10.0, got 30000.0"),  # 3e4 typed for 3e-4
    ("[output]\nname = '" + "x" * 300 + "'", "output.name: 300 bytes long"),
])
def test_values_that_would_misplace_runs_or_classes_are_refused(tmp_path, extra, expected):
    text = GOOD.replace("[task]\n", "").replace("[data]\n", "") if extra.startswith(("[task]", "[data]")) else GOOD
    if extra.startswith("[task]"):
        text = "[data]\ntrain = \"train.jsonl\"\n" + extra + "\ntype = \"classification\"\n"
    elif extra.startswith("[data]"):
        text = "[task]\ntype = \"classification\"\n" + extra + "\ntrain = \"train.jsonl\"\n"
    else:
        text = GOOD + extra + "\n"
    problems = problems_of(tmp_path, text)
    assert any(expected in p for p in problems), problems


def test_explain_takes_one_key_a_bracketed_section_and_transformers_names():
    assert explain("train.lr").splitlines()[:2] == ["[train]", "  lr : float = 0.0"]
    assert explain("learning_rate") == explain("train.lr")
    assert explain("[train]") == explain("train") == explain("TRAIN")  # a section in capitals, not data.train
    with pytest.raises(PeftFtError, match=r"^explain train.foo: unknown key"):
        explain("train.foo")
    with pytest.raises(PeftFtError, match=r"^explain '  ': give a section"):
        explain("  ")


def test_explain_answers_a_key_name_of_several_sections_and_points_a_misspelt_word_at_a_key():
    """`explain dir` said "unknown section" and `explain rank` "did you mean `train`?"; `explain .` named a blank."""
    assert explain("dir") == explain("data.dir") + "\n\n" + explain("output.dir")
    assert explain("rank") == explain("adapter.r")
    for word, says in (("lrr", "did you mean `train.lr`?"), ("tarin", "did you mean `train`?"),
                       ("zzz", "(sections: model, task, data, adapter, train, eval, output)"), (".", "give a section")):
        with pytest.raises(PeftFtError) as refused:
            explain(word)
        assert says in str(refused.value), (word, str(refused.value))


def test_peft_names_and_case_only_typos_get_the_right_suggestion():
    """`lora_r` was steered to `vera_r` (a key of another method); "LoRA" and "NER" got no suggestion at all."""
    from peft_ft.errors import RecipeError
    from peft_ft.recipe.load import build_recipe

    for raw, says in (({"adapter": {"lora_r": 8}}, "adapter.lora_r: unknown key (did you mean `adapter.r`?)"),
                      ({"adapter": {"method": "LoRA"}}, "unknown value 'LoRA' (did you mean 'lora'?)"),
                      ({"task": {"type": "NER"}}, "unknown value 'NER' (did you mean 'ner'?)")):
        with pytest.raises(RecipeError) as refused:
            build_recipe({"data": {"train": "t.jsonl"}, **raw}, "r.toml")
        assert says in str(refused.value), str(refused.value)


@pytest.mark.parametrize("family, unread, read", [
    ("qa", ["task.labels", "data.text_column", "data.text_pair_column", "data.label_column"], []),
    ("ner", ["data.text_pair_column", "data.label_column"], ["data.text_column"]),
    ("seq2seq", ["task.labels", "data.text_pair_column", "data.label_column"], ["data.text_column"]),
])
def test_generic_keys_a_family_never_reads_are_refused_and_the_resolved_copy_loads_again(family, unread, read, tmp_path):
    """A QA recipe with data.label_column trained as if the key were not there: now it says so. The resolved copy a run
    folder keeps (to_toml) writes them at their defaults, which load again."""
    from peft_ft.recipe.dump import to_toml

    value = {"task.labels": '["a"]'}
    text = f'[task]\ntype = "{family}"\n[data]\ntrain = "train.jsonl"\n'
    problems = problems_of(tmp_path, text, [f"{k}={value.get(k, 'x')}" for k in unread])
    said = f"the {family} family does not read it (it would be ignored); remove the key"
    assert len(problems) == len(unread) and all(k in p and p.endswith(said) for k, p in zip(unread, problems)), problems
    recipe = load_recipe(write(tmp_path / "ok.toml", text), [f"{k}=x" for k in read])
    again = write(tmp_path / "again.toml", to_toml(recipe))
    assert load_recipe(again).to_dict() == recipe.to_dict()
    # at its default the key changes nothing: the resolved copies of run folders made before this check hold them all
    load_recipe(write(tmp_path / "old.toml", text + 'label_column = "label"\ntext_pair_column = ""\n'))


def test_the_shipped_adapters_recipes_still_load():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parent.parent / "adapters").glob("*/recipe.toml")):
        load_recipe(path)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path
