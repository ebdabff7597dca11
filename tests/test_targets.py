"""Per-architecture defaults: which layers LoRA and IA3 adapt for each listed model type, and how
every method wraps each architecture. Models are built from tiny configs in code (no weights read)."""

from __future__ import annotations

import pytest

from peft_ft.errors import PeftFtError
from peft_ft.methods import IA3_TARGETS, LORA_TARGETS, METHODS, ia3_targets, lora_targets, prefix_problem
from peft_ft.recipe.load import build_recipe

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}


def tiny_config(model_type: str):
    import transformers as tf

    configs = {
        "bert": lambda: tf.BertConfig(**SIZES),
        "roberta": lambda: tf.RobertaConfig(**SIZES, max_position_embeddings=130),
        "distilbert": lambda: tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
        "deberta-v2": lambda: tf.DebertaV2Config(**SIZES),
        "electra": lambda: tf.ElectraConfig(**SIZES, embedding_size=32),
        "t5": lambda: tf.T5Config(vocab_size=100, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                                  relative_attention_num_buckets=8, decoder_start_token_id=0),
    }
    return configs[model_type]()


MODEL_TYPES = ["bert", "roberta", "distilbert", "deberta-v2", "electra", "t5"]
# The attention projections each architecture names differently, which LoRA must reach.
QUERY_VALUE = {"bert": ("query", "value"), "roberta": ("query", "value"), "electra": ("query", "value"),
               "distilbert": ("q_lin", "v_lin"), "deberta-v2": ("query_proj", "value_proj"), "t5": ("q", "v")}


def tiny_model(model_type: str):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config(model_type)
    if model_type == "t5":
        return AutoModelForSeq2SeqLM.from_config(config), None
    config.num_labels = 3
    return AutoModelForSequenceClassification.from_config(config), "SEQ_CLS"


def heads_of(model) -> list[str]:
    """What a loading report would call the head of a model built from a config: the task model's own layers."""
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None:
        return []
    return [n for n, m in model.named_children() if m is not backbone and any(True for _ in m.parameters())]


def recipe(method: str, **adapter):
    raw = {"model": {"max_length": 16}, "task": {"type": "classification"}, "data": {"train": "t.jsonl"},
           "adapter": {"method": method, **adapter}}
    if method in ("prompt_tuning", "prefix_tuning"):
        raw["adapter"].setdefault("num_virtual_tokens", 4)
    return build_recipe(raw, "r.toml")


def adapted(model, layer_type) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, layer_type)]


def forward(model, model_type: str):
    import torch

    ids = torch.randint(5, 100, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_type == "t5":
        batch["labels"] = torch.randint(5, 100, (2, 3))
    else:
        batch["labels"] = torch.tensor([0, 2])
    return model(**batch)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lora_default_reaches_query_and_value(model_type):
    from peft.tuners.lora import LoraLayer

    model, task_type = tiny_model(model_type)
    assert model.config.model_type == model_type and model_type in LORA_TARGETS
    targets = lora_targets(model, recipe("lora"))
    wrapped = METHODS["lora"].wrap(model, recipe("lora"), heads_of(model), task_type)
    names = adapted(wrapped, LoraLayer)
    layers = 2 * (2 if model_type == "t5" else 1)  # T5: encoder and decoder blocks
    for projection in QUERY_VALUE[model_type]:
        assert len([n for n in names if n.endswith("." + projection)]) >= layers, (projection, names)
    assert all(any(n.endswith("." + t) for n in names) for t in targets)  # every listed name exists in the model
    assert not any(h in n.split(".") for n in names for h in heads_of(model))  # the head is saved whole, not adapted
    assert forward(wrapped, model_type).loss.isfinite()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_ia3_default_scales_keys_values_and_feed_forward_inputs(model_type):
    from peft.tuners.ia3 import IA3Layer

    model, task_type = tiny_model(model_type)
    assert model_type in IA3_TARGETS
    wrapped = METHODS["ia3"].wrap(model, recipe("ia3"), heads_of(model), task_type)
    layers = {n: m for n, m in wrapped.named_modules() if isinstance(m, IA3Layer)}
    feedforward = sorted(n for n, m in layers.items() if m.is_feedforward)
    attention = sorted(n for n, m in layers.items() if not m.is_feedforward)
    blocks = 2 * (3 if model_type == "t5" else 1)  # T5: encoder self, decoder self and cross attention
    key, value = {"distilbert": ("k_lin", "v_lin"), "deberta-v2": ("key_proj", "value_proj"), "t5": ("k", "v")}.get(model_type, ("key", "value"))
    assert len([n for n in attention if n.endswith("." + key)]) == blocks
    assert len([n for n in attention if n.endswith("." + value)]) == blocks
    assert len(attention) == 2 * blocks  # keys and values only
    ff_name = {"distilbert": "lin2", "t5": "wo"}.get(model_type, "output.dense")
    assert feedforward and all(n.endswith(ff_name) for n in feedforward)
    assert not any("attention" in n for n in feedforward)  # BERT's attention.output.dense is no feed-forward layer
    assert len(feedforward) == 2 * (2 if model_type == "t5" else 1)
    assert forward(wrapped, model_type).loss.isfinite()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_methods_wrap_each_architecture_or_refuse_it(model_type, method):
    model, task_type = tiny_model(model_type)
    if method == "prefix_tuning":  # decided by a real forward with a prefix, on a copy of the architecture
        problem = prefix_problem(tiny_model(model_type)[0], task_type)
        if model_type in ("distilbert", "deberta-v2"):
            assert problem and ("ignores the prefix" in problem or "fails" in problem)
            return
        assert problem is None
    wrapped = METHODS[method].wrap(model, recipe(method), heads_of(model), task_type)
    out = forward(wrapped, model_type)
    assert out.loss.isfinite()
    out.loss.backward()
    assert any(p.grad is not None for n, p in wrapped.named_parameters() if "prompt_encoder" in n)


def test_recipe_targets_override_the_table():
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer

    model, task_type = tiny_model("bert")
    wrapped = METHODS["lora"].wrap(model, recipe("lora", target_modules=["query"]), heads_of(model), task_type)
    assert {n.rsplit(".", 1)[-1] for n in adapted(wrapped, LoraLayer)} == {"query"}
    model, task_type = tiny_model("bert")
    r = recipe("ia3", target_modules=["value", "intermediate.dense"], feedforward_modules=[])
    assert ia3_targets(model, r) == (["value", "intermediate.dense"], [])
    wrapped = METHODS["ia3"].wrap(model, r, heads_of(model), task_type)
    layers = {n: m for n, m in wrapped.named_modules() if isinstance(m, IA3Layer)}
    assert len(layers) == 4 and not any(m.is_feedforward for m in layers.values())


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_an_architecture_without_an_entry_lists_its_linear_layers(method):
    import transformers as tf

    model = tf.AutoModelForSequenceClassification.from_config(
        tf.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    assert model.config.model_type not in LORA_TARGETS and model.config.model_type not in IA3_TARGETS
    with pytest.raises(PeftFtError, match=r"adapter.target_modules: no default for model type 'albert'.*"
                                          r"linear layers: .*ffn_output.*query.*value"):
        METHODS[method].wrap(model, recipe(method), ["classifier"], "SEQ_CLS")


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_targeting_the_task_head_is_refused_naming_the_base_layers(method):
    """The head trains in full beside the adapter: targeted alone, peft adapted nothing and raised
    NoMatchingPeftModuleError, a traceback after validate had passed (and had advised lowering adapter.r)."""
    model, _ = tiny_model("bert")
    extra = {"feedforward_modules": []} if method == "ia3" else {}
    targets = lora_targets if method == "lora" else ia3_targets
    with pytest.raises(PeftFtError, match=r"adapter.target_modules: 'classifier' is the task head, .* \(such as query, key"):
        targets(model, recipe(method, target_modules=["classifier"], **extra))
    assert targets(model, recipe(method, target_modules=["query"], **extra))  # a base layer is fine


@pytest.mark.parametrize("method", ["adalora", "vera", "loha", "lokr", "oft", "boft", "fourierft", "vblora"])
def test_methods_on_lora_targets_check_named_targets_on_the_skeleton(method):
    """validate ran no skeleton check for these methods: a target that does not exist (or the head) passed it, and run
    refused it only after loading the model."""
    model, _ = tiny_model("bert")
    with pytest.raises(PeftFtError, match=r"adapter.target_modules: no module named 'nope'"):
        METHODS[method].skeleton_check(model, recipe(method, target_modules=["nope"]))
    with pytest.raises(PeftFtError, match="is the task head"):
        METHODS[method].skeleton_check(model, recipe(method, target_modules=["classifier"]))


def test_a_vblora_topk_above_the_bank_is_a_recipe_error():
    from peft_ft.errors import RecipeError

    with pytest.raises(RecipeError, match=r"adapter.topk \(300\) exceeds adapter.num_vectors \(4\)"):
        recipe("vblora", topk=300, num_vectors=4)
