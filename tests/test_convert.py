"""`finetune convert --to bigbird`: weights copied exactly, positions tiled, parity with the source, and the
converted folder trains as a recipe's checkpoint with block-sparse attention on long inputs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from finetune.training import train
from finetune.cli import main as cli
from finetune.errors import ConversionError
from finetune.models.convert import convert_to_bigbird, parity, tile_positions
from finetune.config.recipe import Recipe
from tests.test_bigbird import _mixed_length_file, mixed_length_recipe

OPTIONS = dict(max_length=1024, block_size=8, num_random_blocks=2)


@pytest.fixture(scope="module")
def converted_bert(tiny_checkpoints, tmp_path_factory):
    target = tmp_path_factory.mktemp("converted") / "bert-bigbird-1024"
    return convert_to_bigbird(str(tiny_checkpoints["bert"]), target, **OPTIONS), target


def test_bert_conversion_reproduces_the_source(converted_bert, tiny_checkpoints):
    report, target = converted_bert
    assert report["parity_max_abs_diff"] <= 1e-4 and report["parity_length"] == 512
    assert json.loads((target / "conversion.json").read_text()) == report
    config = AutoConfig.from_pretrained(target)
    assert (config.model_type, config.max_position_embeddings, config.attention_type, config.block_size,
            config.num_random_blocks) == ("big_bird", 1024, "block_sparse", 8, 2)
    assert AutoTokenizer.from_pretrained(target).model_max_length == 1024
    source = AutoModel.from_pretrained(tiny_checkpoints["bert"]).eval()
    bigbird = AutoModel.from_pretrained(target).eval()
    src, dst = source.state_dict(), bigbird.state_dict()
    # every weight, token types and pooler included, is the source's; positions are the 512 repeated
    assert torch.equal(dst["embeddings.token_type_embeddings.weight"], src["embeddings.token_type_embeddings.weight"])
    assert torch.equal(dst["pooler.weight"], src["pooler.dense.weight"])
    assert torch.equal(dst["encoder.layer.1.output.LayerNorm.weight"], src["encoder.layer.1.output.LayerNorm.weight"])
    positions = src["embeddings.position_embeddings.weight"]
    assert torch.equal(dst["embeddings.position_embeddings.weight"], torch.cat([positions, positions]))
    # checked independently of the command: full attention on 300 real tokens gives the source's states
    bigbird.set_attention_type("original_full")
    assert parity(source, bigbird, 300) <= 1e-4


def test_distilbert_conversion_reproduces_the_source(tiny_checkpoints, tmp_path):
    report = convert_to_bigbird(str(tiny_checkpoints["distilbert"]), tmp_path / "d", **OPTIONS)
    assert report["parity_max_abs_diff"] <= 1e-4 and report["pooler"] is False
    state = AutoModel.from_pretrained(tmp_path / "d").state_dict()
    assert not state["embeddings.token_type_embeddings.weight"].any()  # DistilBERT has none: zeros add nothing


@pytest.mark.no_store  # it checks that nothing is written to its folder
def test_unsupported_sources_and_settings_are_refused(tiny_checkpoints, tmp_path):
    with pytest.raises(ConversionError, match="is a big_bird checkpoint; .* supports bert, distilbert"):
        convert_to_bigbird(str(tiny_checkpoints["big_bird"]), tmp_path / "a", **OPTIONS)
    with pytest.raises(ConversionError, match="--max-length: 1004 is not a multiple of --block-size 8; allowed: a multiple such as 1008"):
        convert_to_bigbird(str(tiny_checkpoints["bert"]), tmp_path / "b", **{**OPTIONS, "max_length": 1004})
    with pytest.raises(ConversionError, match="--max-length: 64 is too short for block_sparse .* at least 73"):
        convert_to_bigbird(str(tiny_checkpoints["bert"]), tmp_path / "c", **{**OPTIONS, "max_length": 64})
    assert not any(tmp_path.iterdir()), "a refused conversion writes nothing"


@pytest.mark.no_store  # it checks that nothing is written to its folder
def test_a_conversion_that_does_not_reproduce_the_source_fails(tiny_checkpoints, tmp_path, monkeypatch):
    from finetune.models import convert

    # A mapping mistake (two layers swapped) must be caught by the parity check, and nothing left behind.
    real = convert.weight_map

    def swapped(*args):
        mapping = real(*args)
        for key in [k for k in mapping if k.startswith("encoder.layer.0.")]:
            other = key.replace("layer.0.", "layer.1.")
            mapping[key], mapping[other] = mapping[other], mapping[key]
        return mapping

    monkeypatch.setattr(convert, "weight_map", swapped)
    with pytest.raises(ConversionError, match="does not reproduce .* differ by up to"):
        convert_to_bigbird(str(tiny_checkpoints["bert"]), tmp_path / "wrong", **OPTIONS)
    assert not any(tmp_path.iterdir())


def test_tile_positions_keeps_the_first_ones():
    weight = torch.arange(6.0).reshape(3, 2)
    assert tile_positions(weight, 7).tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5], [0, 1]]


def test_convert_command(tiny_checkpoints, tmp_path, capsys):
    args = ["convert", "--to", "bigbird", "--max-length", "256", "--block-size", "8", "--num-random-blocks", "2",
            str(tiny_checkpoints["bert"]), str(tmp_path / "out")]
    assert cli(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["parity_max_abs_diff"] <= 1e-4
    assert "hidden states differ from the source's by at most" in captured.err
    assert cli(args) == 2 and "exists and is not empty" in capsys.readouterr().err
    assert cli([*args, "--overwrite"]) == 0


def test_converted_files_follow_the_umask(tiny_checkpoints, tmp_path):
    """safetensors writes its weights 0600 whatever the umask; a converted checkpoint is an ordinary folder."""
    import os
    import stat

    previous = os.umask(0o002)
    try:
        assert cli(["convert", "--to", "fewer-layers", "--layers", "0", str(tiny_checkpoints["bert"]),
                    str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {oct(0o664)}, modes


def test_converted_checkpoint_trains_with_block_sparse_on_long_inputs(converted_bert, tmp_path):
    _, target = converted_bert
    data_file = _mixed_length_file(tmp_path / "mixed.csv")
    recipe = Recipe.model_validate(mixed_length_recipe(target, data_file, max_length=256))
    result = train.main(recipe)
    assert result.attention_batches.get("block_sparse", 0) > 0
    assert result.attention_batches.get("original_full", 0) > 0
    assert json.loads((result.best_dir / "config.json").read_text())["attention_type"] == "block_sparse"
