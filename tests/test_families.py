"""The family layer: each family's structure as freezing, layer-wise learning rates, adapters, pooling, the
masked-positions shortcut and layer selection see it, the checks `validate` and `run` share, and that what a family
is lives in finetune/families only."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.config.recipe import ModelSection, TrainingSection
from finetune.families import FAMILIES, family_of
from finetune.families.pooling import MeanIntoFirst, install_pooling, masked_mean
from finetune.families.support import recipe_problems
from finetune.models import layers
from finetune.tasks import get_task
from tests.conftest import ROOT

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=120)


def small_config(family: str):
    """A two-layer config of each family (no checkpoint: structure only)."""
    import transformers

    return {
        "bert": lambda: transformers.BertConfig(**SMALL),
        "distilbert": lambda: transformers.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
        "big_bird": lambda: transformers.BigBirdConfig(**SMALL, attention_type="original_full", block_size=8,
                                                       num_random_blocks=2, pad_token_id=0, bos_token_id=2,
                                                       eos_token_id=3, sep_token_id=3),
        "roberta": lambda: transformers.RobertaConfig(**SMALL, max_position_embeddings=514, pad_token_id=1),
        "xlm-roberta": lambda: transformers.XLMRobertaConfig(**SMALL, max_position_embeddings=514, pad_token_id=1),
        "deberta-v2": lambda: transformers.DebertaV2Config(
            **SMALL, max_position_embeddings=512, relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"],
            position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0),
        "electra": lambda: transformers.ElectraConfig(**SMALL, embedding_size=16),
        "modernbert": lambda: transformers.ModernBertConfig(**SMALL, max_position_embeddings=512,
                                                            global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1,
                                                            eos_token_id=2, cls_token_id=1, sep_token_id=2),
        "eurobert": lambda: transformers.EuroBertConfig(**SMALL, max_position_embeddings=512, num_key_value_heads=2,
                                                        pad_token_id=1, bos_token_id=2, eos_token_id=3, mask_token_id=4),
    }[family]()


def built(family: str, auto: str = "AutoModelForSequenceClassification", **overrides):
    import transformers

    config = small_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return getattr(transformers, auto).from_config(config).eval()


def batch(config, rows: int = 3, length: int = 9):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, config.vocab_size, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return {"input_ids": input_ids, "attention_mask": mask}


# Modules each family keeps somewhere other than where a name-based guess would look, with the depth they must get.
WHERE = {
    "electra": {"electra.embeddings_project.weight": 0},
    "deberta-v2": {"deberta.encoder.rel_embeddings.weight": 0, "deberta.encoder.LayerNorm.weight": 0},
    "eurobert": {"model.embed_tokens.weight": 0, "model.norm.weight": 3},
    "modernbert": {"model.embeddings.tok_embeddings.weight": 0, "model.final_norm.weight": 3},
    "bert": {"bert.pooler.dense.weight": None},
}


def test_the_nine_families_are_registered():
    assert list(FAMILIES) == ["bert", "distilbert", "big_bird", "roberta", "xlm-roberta", "deberta-v2", "electra",
                              "modernbert", "eurobert"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_parameter_has_the_depth_of_the_module_it_is_in(name):
    model = built(name)
    found, count = layers.depths(model)
    assert count == 2
    family = family_of(model)
    encoder = family.encoder(model)
    prefix = model.base_model_prefix + "."
    for key, depth in WHERE.get(name, {}).items():
        assert found[key] == depth, (key, found[key])
    assert any(d == 0 for d in found.values()) and {1, 2} <= set(found.values())
    for key, depth in found.items():
        if ".layers.0." in key or ".layer.0." in key:
            assert depth == 1, key
        if not key.startswith(prefix):
            assert depth is None, key  # the head
    words = encoder.get_input_embeddings().weight
    assert found[next(k for k, p in model.named_parameters() if p is words)] == 0


@pytest.mark.parametrize("name", ["eurobert", "electra", "deberta-v2"])
def test_freezing_one_layer_freezes_every_embedding_module(name):
    model = built(name)
    layers.freeze(model, 1)
    for key in WHERE[name]:
        if WHERE[name][key] == 0:
            assert not dict(model.named_parameters())[key].requires_grad, key
    top = [k for k, p in model.named_parameters() if p.requires_grad and k.startswith(model.base_model_prefix)]
    assert top and all(".0." not in k for k in top)


@pytest.mark.parametrize("name", ["eurobert", "electra", "deberta-v2"])
def test_layer_wise_decay_gives_the_embeddings_the_lowest_rate(name):
    from finetune.training.optim import parameter_groups

    model = built(name)
    cfg = TrainingSection(learning_rate=1e-3, layer_lr_decay=0.5)
    rates = {id(p): g["lr"] for g in parameter_groups(model, cfg) for p in g["params"]}
    params = dict(model.named_parameters())
    for key, depth in WHERE[name].items():
        assert rates[id(params[key])] == pytest.approx(1e-3 * 0.5 ** (2 - min(depth, 2))), key


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_has_default_lora_targets_that_exist(name):
    from finetune.models.adapters import add_adapter

    model = built(name)
    adapter = SimpleNamespace(r=2, alpha=4, dropout=0.0, target_modules=None)
    wrapped = add_adapter(model, adapter)
    trained = [k for k, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lora_A" in k for k in trained)
    assert all(k for k in trained if "lora_" not in k and "modules_to_save" not in k) is not None
    found, _ = layers.depths(wrapped)
    assert all(found[k] in (1, 2) for k in trained if "lora_" in k)  # adapters sit inside the layers


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_masked_positions_shortcut_gives_the_masked_logits_of_the_full_head(name):
    from finetune.tasks.masked_lm import MASKED_LM

    model = built(name, "AutoModelForMaskedLM")
    inputs = batch(model.config)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, 2], labels[1, 1], labels[2, 0] = 7, 8, 9
    with torch.no_grad():
        full = model(**inputs).logits
        short = MASKED_LM.forward(model, inputs, {"labels": labels}).logits
    assert short.dim() == 2, f"{name}: the shortcut is not used"
    torch.testing.assert_close(short, full[labels != -100], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_mean_pooling_is_what_the_head_reads(name):
    family = FAMILIES[name]
    model = built(name, **family.pooling_config(small_config(name), "mean"))
    install_pooling(model)
    inputs = batch(model.config)
    with torch.no_grad():
        pooled = model(**inputs).logits
    if family.pooling_key is None:
        encoder = family.encoder(model)
        assert isinstance(encoder.__dict__["forward"], MeanIntoFirst)
        with torch.no_grad():
            out = encoder(**inputs)
            plain = encoder.__dict__["forward"].compute(**inputs)
        torch.testing.assert_close(out.last_hidden_state[:, 0],
                                   masked_mean(plain.last_hidden_state, inputs["attention_mask"]))
        torch.testing.assert_close(out.last_hidden_state[:, 1:], plain.last_hidden_state[:, 1:])
    first = built(name, **family.pooling_config(small_config(name), "first"))
    install_pooling(first)
    with torch.no_grad():
        assert not torch.allclose(first(**inputs).logits, pooled), "mean and first pooling gave the same logits"


@pytest.mark.parametrize("name, pooling", [("modernbert", "mean"), ("eurobert", "auto"), ("bert", "mean"),
                                           ("roberta", "first")])
def test_the_frozen_feature_cache_hands_the_head_what_the_encoder_would(name, pooling):
    family = FAMILIES[name]
    model = built(name, **family.pooling_config(small_config(name), pooling))
    install_pooling(model)
    inputs = batch(model.config)
    with torch.no_grad():
        want = model(**inputs).logits
    cache = layers.FrozenFeatureCache(layers.base_module(model), family.head_reads_first_token(model.config))
    with torch.no_grad():
        first = model(**inputs).logits
        again = model(**inputs).logits
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-5)
    assert cache.computed == 3


def test_roberta_positions_start_after_the_padding_index():
    config = small_config("roberta")
    assert family_of(config).usable_positions(config) == 512
    task = get_task("classification")
    recipe = SimpleNamespace(model=ModelSection(checkpoint="x", max_length=513), training=TrainingSection())
    problems = recipe_problems(config, recipe, task)
    assert any("model.max_length: 513" in p and "allowed: at most 512" in p for p in problems), problems
    recipe.model = ModelSection(checkpoint="x", max_length=512)
    assert recipe_problems(config, recipe, task) == []


def test_a_task_without_a_head_in_the_family_is_refused_with_the_reason():
    problems = recipe_problems(small_config("eurobert"),
                               SimpleNamespace(model=ModelSection(checkpoint="x"), training=TrainingSection()),
                               get_task("question_answering"))
    assert len(problems) == 1 and "no question-answering head for eurobert" in problems[0], problems
    assert "sequence-classification" in problems[0]


def test_pooling_is_refused_for_tasks_whose_head_reads_every_token():
    problems = recipe_problems(small_config("bert"),
                               SimpleNamespace(model=ModelSection(checkpoint="x", pooling="mean"),
                                               training=TrainingSection()), get_task("token_classification"))
    assert problems and problems[0].startswith("model.pooling: mean is for the tasks")


def test_modernbert_keeps_its_first_layer_first():
    problem = FAMILIES["modernbert"].layer_selection_problem([2, 0], small_config("modernbert"))
    assert problem and "must start with layer 0" in problem
    config = small_config("modernbert")
    config.num_hidden_layers = 3
    config.layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
    FAMILIES["modernbert"].select_layers(config, [0, 2])
    assert config.num_hidden_layers == 2 and config.layer_types == ["full_attention", "sliding_attention"]


# --- a family the registry does not know, then a module for it --------------------------------------------------

TOY_FAMILY = '''
"""MPNet: BERT's embeddings and layers, relative position buckets shared by every layer, positions from
padding_idx + 1."""

from finetune.families.base import Family


class MPNetFamily(Family):
    name = "mpnet"
    extra_embeddings = ("encoder.relative_attention_bias",)
    head_pooler = "pooler"
    lora_targets = ("q", "v")
    mlm_head = ("lm_head",)

    def position_offset(self, config):
        return config.pad_token_id + 1


MPNET = MPNetFamily()
'''


def mpnet(**extra):
    import transformers

    config = transformers.MPNetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                      vocab_size=120, max_position_embeddings=514, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(config)


def test_a_model_type_no_family_covers_offers_what_can_be_read_and_names_the_rest():
    from finetune.families.support import offers
    from finetune.tasks import TASKS

    model = mpnet()
    family = family_of(model)
    assert not family.known and family.name == "mpnet"
    found, count = layers.depths(model)
    assert count == 2 and found["mpnet.embeddings.word_embeddings.weight"] == 0
    assert found["mpnet.encoder.relative_attention_bias.weight"] == 3  # read as a module above the layers
    said = {o.feature: o.reason for o in offers(model.config, TASKS)}
    assert said["training.freeze N, training.layer_lr_decay"] is None
    assert "no default LoRA targets for mpnet" in said["model.adapter (LoRA) with default targets"]
    assert "masked-LM head is not known" in said["masked-positions shortcut of finetune pretrain"]
    recipe = SimpleNamespace(model=ModelSection(checkpoint="x", pooling="mean", adapter={"r": 2}),
                             training=TrainingSection())
    problems = recipe_problems(model.config, recipe, get_task("classification"))
    assert any(p.startswith("model.pooling: mean: finetune has no family module for mpnet") for p in problems)
    assert any(p.startswith("model.adapter.target_modules: no default LoRA targets for mpnet") for p in problems)


def test_adding_a_family_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    import importlib

    from finetune.families import register_family, unregister_family
    from finetune.models.adapters import add_adapter
    from finetune.tasks.masked_lm import MASKED_LM

    (tmp_path / "toy_mpnet_family.py").write_text(TOY_FAMILY)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("toy_mpnet_family")
    register_family(module.MPNET)  # the registry line
    try:
        model = mpnet()
        assert family_of(model) is module.MPNET
        found, _ = layers.depths(model)
        assert found["mpnet.encoder.relative_attention_bias.weight"] == 0  # the generic stand-in put it on top
        assert family_of(model).usable_positions(model.config) == 512
        wrapped = add_adapter(mpnet(), SimpleNamespace(r=2, alpha=4, dropout=0.0, target_modules=None))
        assert {k.split(".")[-4] for k, p in wrapped.named_parameters() if "lora_A" in k} == {"q", "v"}
        recipe = SimpleNamespace(model=ModelSection(checkpoint="x", pooling="mean", adapter={"r": 2}),
                                 training=TrainingSection())
        assert recipe_problems(model.config, recipe, get_task("classification")) == []
        pooled = install_pooling(mpnet(finetune_pooling="mean"))
        assert isinstance(family_of(pooled).encoder(pooled).__dict__["forward"], MeanIntoFirst)
        import transformers

        mlm = transformers.AutoModelForMaskedLM.from_config(model.config).eval()
        inputs = batch(model.config)
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[0, 3] = 5
        assert MASKED_LM.forward(mlm, inputs, {"labels": labels}).logits.shape == (1, model.config.vocab_size)
    finally:
        unregister_family("mpnet")
    assert not family_of(mpnet()).known


def test_model_types_and_module_names_are_tested_only_in_the_family_layer():
    """What a family is lives in finetune/families: no other module compares a model type or names a family."""
    names = "|".join(re.escape(n) for n in FAMILIES)
    pattern = re.compile(rf"model_type\s*(==|!=|in\b|not in\b)|[=!]=\s*['\"]({names})['\"]|['\"]({names})['\"]\s*[:,)]")
    offenders = []
    for package in ("finetune", "serving"):
        for path in (ROOT / package).rglob("*.py"):
            if Path("finetune/families") in path.relative_to(ROOT).parents:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if pattern.search(code):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)
