"""The tiny checkpoints (tests/tiny_models.py) behave like the hub checkpoints they stand for, in what the library
depends on: special tokens, token type ids, word pieces and the prefix-space rule, offsets, pre-split words, the
special ids and vocabulary size of the config, loading under a task head."""

from __future__ import annotations

import functools
import json
import unicodedata

import pytest

from tests.tiny_models import FAMILIES

BYTE_LEVEL = {"roberta", "modernbert", "eurobert"}
UNIGRAM = {"xlm-roberta", "deberta-v2"}
UNCASED = {"bert", "distilbert", "big_bird", "electra"}
# Tokenizers whose offsets start at the space before a word: no ByteLevel trimming (ModernBERT's template, EuroBERT's
# Llama-3 post-processor with trim_offsets false) and DeBERTa-v3's Metaspace without a whitespace split.
OFFSETS_KEEP_THE_SPACE = {"deberta-v2", "modernbert", "eurobert"}

TOKENIZER_CLASS = {
    "bert": "BertTokenizer", "distilbert": "BertTokenizer", "big_bird": "BertTokenizer", "electra": "BertTokenizer",
    "roberta": "RobertaTokenizer", "xlm-roberta": "XLMRobertaTokenizer", "deberta-v2": "DebertaV2Tokenizer",
    "modernbert": "TokenizersBackend", "eurobert": "TokenizersBackend",
}
WITH_TOKEN_TYPES = {"bert", "distilbert", "big_bird", "electra", "deberta-v2"}

# What the hub tokenizer puts around a text A and a pair A, B.
TEMPLATES = {
    **{f: (["[CLS]", "A", "[SEP]"], ["[CLS]", "A", "[SEP]", "B", "[SEP]"])
       for f in ("bert", "distilbert", "big_bird", "electra", "deberta-v2", "modernbert")},
    **{f: (["<s>", "A", "</s>"], ["<s>", "A", "</s>", "</s>", "B", "</s>"]) for f in ("roberta", "xlm-roberta")},
    "eurobert": (["<|begin_of_text|>", "A"], ["<|begin_of_text|>", "A", "<|begin_of_text|>", "B"]),
}

WORDS = ["The", "film", "wasn't", "unbelievably", "good", "."]
TEXT = "The film wasn't unbelievably good."


@functools.cache
def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenizer_of(tiny_checkpoints, family):
    return _tokenizer(str(tiny_checkpoints[family]))


def _pieces(tokenizer, encoding, word: int) -> list[str]:
    tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    return [t for t, w in zip(tokens, encoding.word_ids()) if w == word]


def _surface(tokenizer, family: str, tokens: list[str]) -> str:
    """The text `tokens` stand for, spaces included (`Ġ`, `▁`), `##` dropped."""
    if family in UNIGRAM:
        return "".join(tokens).replace("▁", " ")
    if family in UNCASED:
        return "".join(t.removeprefix("##") for t in tokens)
    return tokenizer.convert_tokens_to_string(tokens)


def test_every_family_is_built(tiny_checkpoints):
    assert tuple(tiny_checkpoints) == FAMILIES
    for family, path in tiny_checkpoints.items():
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == family
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_loads_as_the_hub_one(tiny_checkpoints, family):
    tokenizer = tokenizer_of(tiny_checkpoints, family)
    assert type(tokenizer).__name__ == TOKENIZER_CLASS[family]
    assert ("token_type_ids" in tokenizer.model_input_names) == (family in WITH_TOKEN_TYPES)
    saved = json.loads((tiny_checkpoints[family] / "tokenizer_config.json").read_text())
    if family in ("modernbert", "eurobert"):
        assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_around_a_text_and_a_pair(tiny_checkpoints, family):
    tokenizer = tokenizer_of(tiny_checkpoints, family)
    a, b = "The film was good.", "It was not."
    single, pair = TEMPLATES[family]
    parts = {"A": tokenizer.tokenize(a), "B": tokenizer.tokenize(b)}

    def expected(template):
        return [t for part in template for t in parts.get(part, [part])]

    assert tokenizer.convert_ids_to_tokens(tokenizer(a)["input_ids"]) == expected(single)
    encoded = tokenizer(a, b)
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == expected(pair)
    if family in WITH_TOKEN_TYPES:
        first = len(expected(pair[:pair.index("A") + 2]))  # A's segment ends with its separator
        assert encoded["token_type_ids"] == [0] * first + [1] * (len(encoded["input_ids"]) - first)
    else:
        assert "token_type_ids" not in encoded


@pytest.mark.parametrize("family", FAMILIES)
def test_config_special_ids_are_the_tokenizers(tiny_checkpoints, family):
    from transformers import AutoConfig

    tokenizer = tokenizer_of(tiny_checkpoints, family)
    config = AutoConfig.from_pretrained(tiny_checkpoints[family])
    # A config's bos/eos stand for the tokenizer's [CLS]/[SEP] where it has no bos/eos token (BigBird, ModernBERT).
    fallback = {"bos": "cls", "eos": "sep"}
    checked = []
    for name in ("pad", "bos", "eos", "cls", "sep", "mask"):
        config_id = getattr(config, f"{name}_token_id", None)
        if config_id is None:
            continue
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is None and name in fallback:
            token_id = getattr(tokenizer, f"{fallback[name]}_token_id")
        assert config_id == token_id, name
        checked.append(name)
    assert "pad" in checked
    if family == "eurobert":
        assert tokenizer.pad_token == tokenizer.eos_token == "<|end_of_text|>"
        assert config.mask_token_id == tokenizer.mask_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_sit_where_the_real_ones_do(tiny_checkpoints, family):
    tokenizer = tokenizer_of(tiny_checkpoints, family)
    ids = tokenizer.convert_tokens_to_ids
    last = len(tokenizer) - 1
    if family in ("roberta", "xlm-roberta"):
        assert [ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, last]
    elif family == "deberta-v2":
        assert [ids(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")] == [0, 1, 2, 3, last]
    elif family == "electra":  # bert-base-uncased's vocabulary layout
        named = ("[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
        assert [ids(t) for t in named] == [0, 1, 100, 101, 102, 103]
    elif family == "modernbert":  # right after the BPE vocabulary, then [unusedN]
        first = ids("[UNK]")
        assert [ids(t) for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")] == list(range(first, first + 5))
        assert tokenizer.convert_ids_to_tokens(list(range(first + 5, last + 1))) == [
            f"[unused{i}]" for i in range(last - first - 4)]
    elif family == "eurobert":  # Llama-3's first special tokens, right after the BPE vocabulary
        first = ids("<|begin_of_text|>")
        assert [ids(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|mask|>")] == [first, first + 1, last]
        assert first + 2 == last
    else:  # the hand-made vocabulary of the first tests
        assert [ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("family", FAMILIES)
def test_vocab_size_covers_the_tokenizer(tiny_checkpoints, family):
    from transformers import AutoConfig

    size = len(tokenizer_of(tiny_checkpoints, family))
    config = AutoConfig.from_pretrained(tiny_checkpoints[family])
    if family == "modernbert":  # padded to a multiple of 64 with [unusedN] tokens, as the real one
        assert size <= config.vocab_size < size + 64 and config.vocab_size % 64 == 0
    else:
        assert config.vocab_size == size


@pytest.mark.parametrize("family", FAMILIES)
def test_word_pieces_follow_the_prefix_space_rule(tiny_checkpoints, family):
    tokenizer = tokenizer_of(tiny_checkpoints, family)
    at_start, after_space = tokenizer.tokenize("film")[0], tokenizer.tokenize("a film")[1]
    # Common words are whole tokens.
    assert len(tokenizer.tokenize("a film about the movie")) == 5
    if family in BYTE_LEVEL:
        assert after_space == "Ġfilm" and at_start != after_space
    elif family in UNIGRAM:
        assert at_start == after_space == "▁film"
        encoded = tokenizer(TEXT)
        starts = [_pieces(tokenizer, encoded, w)[0] for w in sorted(set(encoded.word_ids()) - {None})]
        assert all(piece.startswith("▁") for piece in starts)
    else:
        assert at_start == after_space == "film"


@pytest.mark.parametrize("family", FAMILIES)
def test_offsets_map_back_to_the_text(tiny_checkpoints, family):
    tokenizer = tokenizer_of(tiny_checkpoints, family)
    encoded = tokenizer(TEXT, return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    special = set(tokenizer.all_special_ids)
    for token_id, token, (start, end) in zip(encoded["input_ids"], tokens, encoded["offset_mapping"]):
        if token_id in special:
            assert start == end == 0
            continue
        surface = _surface(tokenizer, family, [token]).strip()
        assert TEXT[start:end].strip() == (surface.lower() if family in UNCASED else surface) or (
            family in UNCASED and TEXT[start:end].lower() == surface), token
    film = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("a film")[-1])
    start, end = encoded["offset_mapping"][encoded["input_ids"].index(film)]
    assert TEXT[start:end] == (" film" if family in OFFSETS_KEEP_THE_SPACE else "film")


@pytest.mark.parametrize("prefix", ["", " "], ids=["words", "space-prefixed-words"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pre_split_words_map_to_their_pieces(tiny_checkpoints, family, prefix):
    tokenizer = tokenizer_of(tiny_checkpoints, family)
    encoded = tokenizer([prefix + w for w in WORDS], is_split_into_words=True)
    word_ids = encoded.word_ids()
    special = set(tokenizer.all_special_ids)
    assert [w is None for w in word_ids] == [i in special for i in encoded["input_ids"]]
    seen = [w for w in word_ids if w is not None]
    assert seen == sorted(seen) and set(seen) == set(range(len(WORDS)))
    for index, word in enumerate(WORDS):
        surface = _surface(tokenizer, family, _pieces(tokenizer, encoded, index)).strip()
        assert surface == (word.lower() if family in UNCASED else word)


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_split_words_and_running_text(tiny_checkpoints, family):
    """transformers 5 tokenizes each pre-split word as a text of its own, with no error or warning: byte-level BPE
    then gives a word no `Ġ` (its pieces differ from running text) unless the word is passed with a leading space;
    Unigram and WordPiece give the same pieces either way."""
    tokenizer = tokenizer_of(tiny_checkpoints, family)
    running = tokenizer.tokenize("The film")[len(tokenizer.tokenize("The")):]
    plain = _pieces(tokenizer, tokenizer(["The", "film"], is_split_into_words=True), 1)
    spaced = _pieces(tokenizer, tokenizer(["The", " film"], is_split_into_words=True), 1)
    assert spaced == running
    if family in BYTE_LEVEL:
        assert plain != running and not plain[0].startswith("Ġ")
    else:
        assert plain == running


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_token_takes_the_space_before_it(tiny_checkpoints, family):
    tokenizer = tokenizer_of(tiny_checkpoints, family)
    ids = tokenizer(f"a {tokenizer.mask_token}", add_special_tokens=False)["input_ids"]
    assert ids == tokenizer("a", add_special_tokens=False)["input_ids"] + [tokenizer.mask_token_id]


def test_xlm_roberta_normalizes_with_a_precompiled_nfkc_charsmap(tiny_checkpoints):
    tokenizer = tokenizer_of(tiny_checkpoints, "xlm-roberta")
    normalizer = tokenizer.backend_tokenizer.normalizer
    assert type(normalizer).__name__ == "Precompiled"
    for char in ["ﬁ", "Ｆ", "\u00a0", "…", "½", "①", "™", "é"]:
        assert normalizer.normalize_str(char) == unicodedata.normalize("NFKC", char), repr(char)
    assert tokenizer.tokenize("ﬁlm") == tokenizer.tokenize("film")


def test_the_precompiled_charsmap_finds_every_key_and_only_those():
    from tokenizers import normalizers

    from tests.tiny_models import _precompiled_charsmap

    mapping = {"é": "e", "ﬁ": "fi", "ß": "ss", "€": "EUR", "\u00a0": " ", "ａ": "a", "ê": "ê"}
    charsmap = _precompiled_charsmap({k.encode(): v.encode() for k, v in mapping.items()})
    normalizer = normalizers.Precompiled(charsmap)
    for key, value in mapping.items():
        assert normalizer.normalize_str(key) == value
    # Characters sharing a key's first UTF-8 bytes but not in the map stay as they are.
    assert normalizer.normalize_str("èëﬂｂ plain") == "èëﬂｂ plain"


@pytest.mark.parametrize("head", ["AutoModelForSequenceClassification", "AutoModelForTokenClassification"])
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_under_a_task_head_and_runs_a_pair_batch(tiny_checkpoints, family, head):
    import torch
    import transformers

    path = tiny_checkpoints[family]
    tokenizer = tokenizer_of(tiny_checkpoints, family)
    model, info = getattr(transformers, head).from_pretrained(path, num_labels=3, output_loading_info=True)
    prefix = model.base_model_prefix + "."
    # The encoder comes from the checkpoint; only a pooler a token head has no use for is left over, as with hub
    # checkpoints.
    assert not [k for k in info["missing_keys"] if k.startswith(prefix)]
    assert not [k for k in info["unexpected_keys"] if "pooler" not in k] and not info["mismatched_keys"]
    batch = tokenizer(["The film was good.", "Bad."], ["It was.", "A long and boring film, not good at all."],
                      padding=True, return_tensors="pt")
    assert set(batch) == set(tokenizer.model_input_names)
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    shape = (2, 3) if head.endswith("SequenceClassification") else (2, batch["input_ids"].shape[1], 3)
    assert logits.shape == shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_roberta_positions_start_after_the_padding_index(tiny_checkpoints, family):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_checkpoints[family]).eval()
    assert model.config.max_position_embeddings == 514 and model.config.pad_token_id == 1
    tokenizer = tokenizer_of(tiny_checkpoints, family)
    batch = tokenizer(" ".join(["film"] * 600), truncation=True, max_length=512, return_tensors="pt")
    assert batch["input_ids"].shape == (1, 512)
    with torch.no_grad():
        assert model(**batch).last_hidden_state.shape == (1, 512, 32)


def test_architectures_are_like_the_real_ones(tiny_checkpoints):
    from transformers import AutoConfig, AutoModel

    def load(family):
        return AutoModel.from_pretrained(tiny_checkpoints[family])

    deberta = load("deberta-v2")
    config = deberta.config
    assert config.relative_attention and config.position_buckets == 256 and config.share_att_key
    assert list(config.pos_att_type) == ["p2c", "c2p"] and config.norm_rel_ebd == "layer_norm"
    # DeBERTa-v3: relative positions only, no token types.
    assert deberta.embeddings.position_embeddings is None and deberta.embeddings.token_type_embeddings is None
    assert deberta.encoder.rel_embeddings is not None and deberta.encoder.LayerNorm is not None
    assert load("electra").embeddings_project.in_features == 16
    modernbert = AutoConfig.from_pretrained(tiny_checkpoints["modernbert"])
    assert set(modernbert.layer_types) == {"full_attention", "sliding_attention"}
    eurobert = AutoConfig.from_pretrained(tiny_checkpoints["eurobert"])
    assert eurobert.num_key_value_heads == 2 and eurobert.num_attention_heads == 2
    for family in FAMILIES:
        config = AutoConfig.from_pretrained(tiny_checkpoints[family])
        hidden = getattr(config, "dim", None) or config.hidden_size
        layers = getattr(config, "n_layers", None) or config.num_hidden_layers
        assert (hidden, layers) == (32, 2), family
