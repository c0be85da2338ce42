"""`finetune convert --to fewer-layers`: exactly the named layers' weights are kept, renumbered; the rest is the
source's; layers the source does not have are refused, naming the ones it has."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, BertConfig

from finetune.cli import main as cli
from finetune.errors import ConversionError
from finetune.models.layer_selection import select_layers


@pytest.fixture(scope="module")
def four_layer_bert(tiny_checkpoints, tmp_path_factory):
    """A 4-layer tiny BERT with a classification head, as a fine-tuned teacher folder would have."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "bert4"
    base = AutoConfig.from_pretrained(tiny_checkpoints["bert"]).to_dict()
    config = BertConfig(**{**base, "num_hidden_layers": 4, "num_labels": 2})
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_checkpoints["bert"]).save_pretrained(path)
    return path


def _layer(state: dict, prefix: str, index: int) -> dict:
    start = f"{prefix}{index}."
    return {k[len(start):]: v for k, v in state.items() if k.startswith(start)}


@pytest.mark.parametrize("family,prefix", [("bert", "encoder.layer."), ("distilbert", "transformer.layer."),
                                           ("big_bird", "encoder.layer.")])
def test_the_named_layers_are_kept_exactly(tiny_checkpoints, tmp_path, family, prefix):
    report = select_layers(str(tiny_checkpoints[family]), tmp_path / "student", [1])
    assert report["layers_kept"] == [1] and report["source_layers"] == 2
    source = load_file(str(tiny_checkpoints[family] / "model.safetensors"))
    student = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert AutoConfig.from_pretrained(tmp_path / "student").num_hidden_layers == 1
    kept = _layer(student, prefix, 0)
    assert kept and all(torch.equal(v, _layer(source, prefix, 1)[k]) for k, v in kept.items())
    assert set(_layer(source, prefix, 1)) == set(kept) and not _layer(student, prefix, 1)
    outside = {k for k in source if not k.startswith(prefix)}
    assert outside == {k for k in student if not k.startswith(prefix)}
    assert all(torch.equal(source[k], student[k]) for k in outside)
    AutoModel.from_pretrained(tmp_path / "student")  # loads as an ordinary checkpoint


def test_a_fine_tuned_teacher_keeps_its_head_and_layers_in_the_order_given(four_layer_bert, tmp_path, capsys):
    assert cli(["convert", "--to", "fewer-layers", "--layers", "0,3", str(four_layer_bert), str(tmp_path / "s")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers_kept"] == [0, 3] and report["parameters"] < report["source_parameters"]
    source = load_file(str(four_layer_bert / "model.safetensors"))
    student = load_file(str(tmp_path / "s" / "model.safetensors"))
    for new, old in ((0, 0), (1, 3)):
        theirs = _layer(source, "bert.encoder.layer.", old)
        assert all(torch.equal(v, theirs[k]) for k, v in _layer(student, "bert.encoder.layer.", new).items())
    assert torch.equal(student["classifier.weight"], source["classifier.weight"])
    assert json.loads((tmp_path / "s" / "conversion.json").read_text())["to"] == "fewer-layers"


@pytest.mark.no_store  # it checks that nothing is written to its folder
def test_layers_the_source_does_not_have_are_refused(tiny_checkpoints, tmp_path, capsys):
    with pytest.raises(ConversionError, match="--layers: 2, 5 are not layers of .*, which has layers 0 to 1 \\(2 layers\\)"):
        select_layers(str(tiny_checkpoints["bert"]), tmp_path / "a", [0, 2, 5])
    with pytest.raises(ConversionError, match="--layers: 1 given more than once"):
        select_layers(str(tiny_checkpoints["bert"]), tmp_path / "b", [1, 1])
    assert not any(tmp_path.iterdir()), "a refused conversion writes nothing"
    bert = str(tiny_checkpoints["bert"])
    assert cli(["convert", "--to", "fewer-layers", bert, str(tmp_path / "c")]) == 2
    assert "--to fewer-layers needs --layers" in capsys.readouterr().err
    assert cli(["convert", "--to", "fewer-layers", "--layers", "0,x", bert, str(tmp_path / "c")]) == 2
    assert "expected layer numbers separated by commas" in capsys.readouterr().err
    assert cli(["convert", "--to", "bigbird", "--layers", "0", bert, str(tmp_path / "c")]) == 2
    assert "--layers is for --to fewer-layers" in capsys.readouterr().err
