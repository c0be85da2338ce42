"""Tiny random-weight checkpoints of the encoder families the tests cover, each with a tokenizer built the way its
real hub tokenizer is: the same model kind (WordPiece, byte-level BPE, SentencePiece-style Unigram), normalizer,
pre-tokenizer, post-processor, special tokens in their real order, loading as the same tokenizer class. Only the
vocabulary is small, trained on the shipped sample texts, so tests see the word pieces, offsets and special tokens
users see.

What each family copies (transformers 5 rebuilds the pipeline of a tokenizer class with its own `__init__` from the
class, keeping only the vocabulary, merges and a Precompiled charsmap of tokenizer.json; the rest of tokenizer.json
counts only for the classes that load it as it is, ModernBERT's and EuroBERT's):

- bert, distilbert, big_bird: one small hand-made WordPiece vocabulary (`_vocab`), lowercase, as since the start.
- electra: google/electra-small-discriminator, BERT's uncased WordPiece: [PAD]=0, [unused0..98], [UNK]=100,
  [CLS]=101, [SEP]=102, [MASK]=103; `[CLS] A [SEP] B [SEP]` with token type ids.
- roberta: FacebookAI/roberta-base, GPT-2 byte-level BPE (`Ġ` marks a preceding space): <s>=0, <pad>=1, </s>=2,
  <unk>=3, <mask> last (lstrip); `<s> A </s></s> B </s>`, no token type ids; add_prefix_space False, trim_offsets.
- xlm-roberta: FacebookAI/xlm-roberta-base, SentencePiece Unigram (`▁` marks a word start, prepended to every
  word) behind a Precompiled NFKC charsmap: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last; `<s> A </s></s> B </s>`.
- deberta-v2: microsoft/deberta-v3-base, SentencePiece Unigram: [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3, [MASK] last;
  `[CLS] A [SEP] B [SEP]` with token type ids 0/1 (the model has no token type embeddings: type_vocab_size 0).
- modernbert: answerdotai/ModernBERT-base, OLMo's (GPT-NeoX) byte-level BPE with NFC, [UNK] [CLS] [SEP] [PAD]
  [MASK] (lstrip) right after the BPE vocabulary, [unusedN] up to a multiple of 64 (OLMo's own extra tokens,
  <|padding|>, <|endoftext|> and the PII placeholders, are left out); `[CLS] A [SEP] B [SEP]`, inputs input_ids
  and attention_mask only; offsets keep the space before a word (no ByteLevel trimming).
- eurobert: EuroBERT/EuroBERT-210m, Llama-3's byte-level BPE (split regex, then ByteLevel without its regex),
  <|begin_of_text|>, <|end_of_text|> (also padding), <|mask|> (lstrip) after the vocabulary, Llama-3's other
  reserved tokens left out; Llama-3's template: BOS before each text (`<|begin_of_text|> A <|begin_of_text|> B`),
  no EOS; offsets keep the space before a word.
"""

from __future__ import annotations

import collections
import csv
import json
import re
import struct
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
TEST_DATA = Path(__file__).resolve().parent / "data"

FAMILIES: tuple[str, ...] = (
    "bert", "distilbert", "big_bird", "roberta", "xlm-roberta", "deberta-v2", "electra", "modernbert", "eurobert",
)

# Every family's encoder is this small; the families' own names for the sizes are mapped below.
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

# Enough that the common words of the samples are whole tokens, few enough to train in well under a second each.
BPE_VOCAB_SIZE = 2000
UNIGRAM_VOCAB_SIZE = 1500
WORDPIECE_VOCAB_SIZE = 1500

# GPT-4 / Llama-3's pre-tokenizer split: contractions case-insensitively, a letter run with at most one leading
# non-letter, numbers of at most three digits, punctuation with its leading space.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _vocab() -> list[str]:
    """A small WordPiece vocabulary from the shipped samples, so tiny models see real words."""
    counts: collections.Counter[str] = collections.Counter()
    files = [DATA / "sst2" / "train.tsv", TEST_DATA / "mrpc_sample.tsv", TEST_DATA / "goemotions_sample.tsv"]
    for path in files:
        with open(path, encoding="utf-8") as f:
            for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                for cell in row:
                    counts.update(re.findall(r"\w+|[^\w\s]", cell.lower()))
    words = [w for w, _ in counts.most_common(1500)]
    chars = sorted({c for w in words for c in w})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return specials + chars + [f"##{c}" for c in chars] + [w for w in words if w not in chars]


def sample_texts() -> list[str]:
    """Every text of the shipped samples (SST-2, MRPC, GoEmotions, CODAH, the CoNLL and SQuAD samples), as the
    tasks read them: the tokenizers are trained on what the tests tokenize."""
    texts: list[str] = []

    def columns(path: Path, wanted: list[str] | list[int]) -> None:
        with open(path, encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if isinstance(wanted[0], str):
            header, rows = rows[0], rows[1:]
            wanted = [header.index(name) for name in wanted]
        texts.extend(row[i] for row in rows for i in wanted if i < len(row))

    columns(DATA / "sst2" / "train.tsv", ["sentence"])
    columns(TEST_DATA / "mrpc_sample.tsv", ["sentence1", "sentence2"])
    columns(TEST_DATA / "goemotions_sample.tsv", ["text"])
    columns(TEST_DATA / "codah_sample.tsv", [1, 2, 3, 4, 5])  # no header: category, prompt, four endings, label
    words: list[str] = []
    for line in (TEST_DATA / "ner_sample.conll").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("-DOCSTART-"):
            words.append(line.split()[0])
        elif words:
            texts.append(" ".join(words))
            words = []
    if words:
        texts.append(" ".join(words))
    squad = json.loads((TEST_DATA / "squad_sample.json").read_text(encoding="utf-8"))
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            texts.append(paragraph["context"])
            texts.extend(qa["question"] for qa in paragraph["qas"])
    return texts


# --- the vocabularies ---------------------------------------------------------------------------------------------


def _train_byte_bpe(texts: list[str], pre_tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary (all 256 byte symbols, then merges) and its merges, with no special tokens: each
    family places its own around it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _train_unigram(texts: list[str]) -> list[tuple[str, float]]:
    """SentencePiece-style Unigram pieces with their log probabilities, without special tokens (XLM-R and DeBERTa-v3
    put different ones in front)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    # One EM sub-iteration and halving per round: the vocabulary is as good for tests, the training twice as fast.
    trainer = trainers.UnigramTrainer(vocab_size=UNIGRAM_VOCAB_SIZE, special_tokens=["<unk>"], unk_token="<unk>",
                                      n_sub_iterations=1, shrinking_factor=0.5, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    pieces = json.loads(tokenizer.to_str())["model"]["vocab"]
    return [(piece, score) for piece, score in pieces if piece != "<unk>"]


def _train_wordpiece(texts: list[str], specials: list[str]) -> list[str]:
    """An uncased WordPiece vocabulary (BERT's normalizer and pre-tokenizer), `specials` first in their order."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=WORDPIECE_VOCAB_SIZE + len(specials), special_tokens=specials,
                                        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    vocab = tokenizer.get_vocab()
    return sorted(vocab, key=vocab.get)


def _nfkc_charsmap() -> bytes:
    """A SentencePiece precompiled charsmap (the `nmt_nfkc` rules XLM-R's spm model carries) for the characters NFKC
    changes in the blocks text most often has them: Latin-1, general punctuation, letterlike symbols, number forms,
    enclosed alphanumerics, ligatures and full-width forms. The real charsmap covers all of Unicode; this one is the
    same format, so `Precompiled` normalizes like the real one wherever the samples and tests go."""
    blocks = [(0x00A0, 0x0100), (0x2000, 0x2070), (0x2100, 0x2190), (0x2460, 0x2500), (0xFB00, 0xFB07),
              (0xFF01, 0xFF5F)]
    mapping = {}
    for start, stop in blocks:
        for code in range(start, stop):
            char = chr(code)
            normal = unicodedata.normalize("NFKC", char)
            if normal != char and normal:
                mapping[char.encode("utf-8")] = normal.encode("utf-8")
    return _precompiled_charsmap(mapping)


def _precompiled_charsmap(mapping: dict[bytes, bytes]) -> bytes:
    """`mapping` in SentencePiece's precompiled charsmap format: the byte size of a darts-clone double array, the
    array (little-endian uint32 units) and the NUL-terminated replacements the array's leaves point into."""
    normalized = bytearray()
    values = {}
    for key, replacement in sorted(mapping.items()):
        values[key] = len(normalized)
        normalized += replacement + b"\0"

    trie: dict = {}
    for key in values:
        node = trie
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = values[key]

    units: dict[int, int] = {}
    used_bases: set[int] = set()

    def unit(label: int, offset: int, has_leaf: bool) -> int:
        assert offset < 1 << 21
        return label | (offset << 10) | (int(has_leaf) << 8)

    def place(node: dict, position: int, label: int) -> None:
        # A node's children sit at base ^ label, its value (when a key ends here) at base ^ 0; distinct bases keep
        # a lookup of a label the node lacks from landing on another node's child of that label.
        labels = [b for b in node if b is not None]
        base = 1
        while (base in used_bases or (None in node and base in units)
               or any((base ^ b) in units or (base ^ b) == 0 for b in labels)):
            base += 1
        used_bases.add(base)
        units[position] = unit(label, position ^ base, None in node)
        if None in node:
            units[base] = node[None] | (1 << 31)
        for b in labels:
            units[base ^ b] = 0  # reserved until placed
        for b in labels:
            place(node[b], base ^ b, b)

    place(trie, 0, 0)
    array = [units.get(i, 0) for i in range(max(units) + 1)]
    blob = struct.pack(f"<{len(array)}I", *array)
    return struct.pack("<I", len(blob)) + blob + bytes(normalized)


# --- the tokenizers -----------------------------------------------------------------------------------------------


def _bert_tokenizer():
    from transformers import BertTokenizerFast

    # transformers 5 takes the vocabulary itself (a `vocab_file=` argument is silently ignored).
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(_vocab())}, do_lower_case=True)
    assert tokenizer.tokenize("the film") == ["the", "film"]
    return tokenizer


# bert-base-uncased's order, which ELECTRA kept: [PAD]=0, [unused0..98], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103.
ELECTRA_SPECIALS = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _electra_tokenizer(vocab: list[str]):
    from transformers import BertTokenizer

    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True, model_max_length=512)


def _lstrip_mask(content: str):
    """The mask token as the hub's tokenizer.json declares it: it takes the space before it, so `a <mask>` is two
    tokens, not three."""
    from tokenizers import AddedToken

    return AddedToken(content, lstrip=True, rstrip=False, normalized=False, special=True)


def _roberta_tokenizer(bpe: tuple[dict[str, int], list]):
    from transformers import RobertaTokenizer

    pieces, merges = bpe
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({token: 4 + i for token, i in pieces.items()})
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=merges, add_prefix_space=False, trim_offsets=True,
                            mask_token=_lstrip_mask("<mask>"), model_max_length=512)


def _xlm_roberta_tokenizer(pieces: list[tuple[str, float]]):
    from transformers import XLMRobertaTokenizer

    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces, ("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=vocab, _spm_precompiled_charsmap=_nfkc_charsmap(),
                               mask_token=_lstrip_mask("<mask>"), model_max_length=512)


def _deberta_v3_tokenizer(pieces: list[tuple[str, float]]):
    from transformers import DebertaV2Tokenizer

    vocab = [("[PAD]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[UNK]", 0.0), *pieces, ("[MASK]", 0.0)]
    return DebertaV2Tokenizer(vocab=vocab, do_lower_case=False, split_by_punct=False, vocab_type="spm",
                              model_max_length=512)


def _modernbert_tokenizer(bpe: tuple[dict[str, int], list]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import TokenizersBackend

    pieces, merges = bpe
    backend = Tokenizer(models.BPE(vocab=dict(pieces), merges=list(merges), fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, normalized=False, special=True) for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]")]
    backend.add_special_tokens([*specials, _lstrip_mask("[MASK]")])
    size = backend.get_vocab_size()
    backend.add_tokens([AddedToken(f"[unused{i}]", normalized=False) for i in range(-size % 64)])
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return TokenizersBackend(
        tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token=_lstrip_mask("[MASK]"), model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=True, model_max_length=512)


def _eurobert_tokenizer(bpe: tuple[dict[str, int], list]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import TokenizersBackend

    pieces, merges = bpe
    # Llama-3 looks a whole pre-token up before merging (ignore_merges) and has no unknown token.
    backend = Tokenizer(models.BPE(vocab=dict(pieces), merges=list(merges), ignore_merges=True, fuse_unk=False))
    backend.pre_tokenizer = _llama3_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([
        AddedToken("<|begin_of_text|>", normalized=False, special=True),
        AddedToken("<|end_of_text|>", normalized=False, special=True),
        _lstrip_mask("<|mask|>"),
    ])
    bos = backend.token_to_id("<|begin_of_text|>")
    # Llama-3's template, which EuroBERT kept: BOS only. transformers' EuroBERT integration test reads 4 tokens for
    # "Hello World!" (3 pieces + 1 special), and EuroBERT's pretraining appends <|end_of_text|> to what its tokenizer
    # returns; its tokenizer.json itself could not be looked up.
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A:0",
                                      pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    return TokenizersBackend(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>", mask_token=_lstrip_mask("<|mask|>"),
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=True)


def _llama3_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


# The tokenizer class each family's hub tokenizer_config.json names, where save_pretrained writes another name
# for the same class (both load TokenizersBackend in transformers 5).
HUB_TOKENIZER_CLASS = {"modernbert": "PreTrainedTokenizerFast", "eurobert": "PreTrainedTokenizerFast"}


# --- the models ---------------------------------------------------------------------------------------------------


def _configs(tokenizers: dict) -> dict:
    from transformers import (BertConfig, BigBirdConfig, DebertaV2Config, DistilBertConfig, ElectraConfig,
                              EuroBertConfig, ModernBertConfig, RobertaConfig, XLMRobertaConfig)

    def size(family: str) -> int:
        return len(tokenizers[family])

    def ids(family: str, **names: str) -> dict[str, int]:
        """The config's special ids (`pad="pad"`: pad_token_id) from the tokenizer's (ModernBERT's config has a
        bos and an eos id, its tokenizer only [CLS] and [SEP]: `bos="cls"`)."""
        return {f"{key}_token_id": getattr(tokenizers[family], f"{name}_token_id") for key, name in names.items()}

    bert_size = size("bert")
    return {
        "bert": BertConfig(vocab_size=bert_size, max_position_embeddings=512, **SMALL),
        "distilbert": DistilBertConfig(vocab_size=bert_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                       max_position_embeddings=512),
        "big_bird": BigBirdConfig(
            vocab_size=bert_size, max_position_embeddings=1024, attention_type="block_sparse", block_size=8,
            num_random_blocks=2, pad_token_id=0, bos_token_id=2, eos_token_id=3, sep_token_id=3, **SMALL,
        ),
        # RoBERTa's positions start after the padding index: 512 usable positions need 514 rows.
        "roberta": RobertaConfig(vocab_size=size("roberta"), max_position_embeddings=514, type_vocab_size=1,
                                 **ids("roberta", pad="pad", bos="bos", eos="eos"), **SMALL),
        "xlm-roberta": XLMRobertaConfig(vocab_size=size("xlm-roberta"), max_position_embeddings=514,
                                        type_vocab_size=1, **ids("xlm-roberta", pad="pad", bos="bos", eos="eos"),
                                        **SMALL),
        "deberta-v2": DebertaV2Config(
            vocab_size=size("deberta-v2"), max_position_embeddings=512, relative_attention=True,
            position_buckets=256, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
            position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0,
            layer_norm_eps=1e-7, **ids("deberta-v2", pad="pad"), **SMALL,
        ),
        # Real discriminators embed smaller than their hidden size, so `embeddings_project` exists.
        "electra": ElectraConfig(vocab_size=size("electra"), embedding_size=16, max_position_embeddings=512,
                                 **ids("electra", pad="pad"), **SMALL),
        "modernbert": ModernBertConfig(
            vocab_size=size("modernbert"), max_position_embeddings=512, global_attn_every_n_layers=2,
            local_attention=16, **ids("modernbert", pad="pad", bos="cls", eos="sep", cls="cls", sep="sep"),
            **SMALL,
        ),
        "eurobert": EuroBertConfig(
            vocab_size=size("eurobert"), max_position_embeddings=512, num_key_value_heads=2,
            **ids("eurobert", pad="pad", bos="bos", eos="eos", mask="mask"), **SMALL,
        ),
    }


def build_tiny_tokenizers() -> dict:
    """Each family's tokenizer (see the module docstring), in memory, by the family's transformers model_type."""
    from concurrent.futures import ThreadPoolExecutor

    from tokenizers import pre_tokenizers

    texts = sample_texts()
    # The trainers run in Rust without the GIL, one thread each (the tests set TOKENIZERS_PARALLELISM=false): side
    # by side they take as long as the slowest, the Unigram one, instead of the sum.
    with ThreadPoolExecutor(max_workers=4) as pool:
        unigram = pool.submit(_train_unigram, texts)  # the longest first
        gpt2_bpe = pool.submit(_train_byte_bpe, texts,
                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        llama3_bpe = pool.submit(_train_byte_bpe, texts, _llama3_pre_tokenizer())
        electra = pool.submit(_train_wordpiece, texts, ELECTRA_SPECIALS)
        bert = _bert_tokenizer()
        return {
            "bert": bert, "distilbert": bert, "big_bird": bert,
            "roberta": _roberta_tokenizer(gpt2_bpe.result()),
            "xlm-roberta": _xlm_roberta_tokenizer(unigram.result()),
            "deberta-v2": _deberta_v3_tokenizer(unigram.result()),
            "electra": _electra_tokenizer(electra.result()),
            "modernbert": _modernbert_tokenizer(gpt2_bpe.result()),
            "eurobert": _eurobert_tokenizer(llama3_bpe.result()),
        }


def build_tiny_checkpoints(root: Path) -> dict[str, Path]:
    """Save a random-weight base model (safetensors) and its tokenizer for every family in FAMILIES under
    `root`/<family>; returns the folders by family (the transformers model_type). Each model is initialised right
    after `torch.manual_seed(0)`, so a family's weights do not depend on which others are built."""
    import torch
    from transformers import AutoModel

    tokenizers = build_tiny_tokenizers()
    configs = _configs(tokenizers)
    paths = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = AutoModel.from_config(configs[family])
        path = Path(root) / family
        model.save_pretrained(path, safe_serialization=True)
        tokenizers[family].save_pretrained(path)
        if family in HUB_TOKENIZER_CLASS:
            config_file = path / "tokenizer_config.json"
            saved = json.loads(config_file.read_text(encoding="utf-8"))
            saved["tokenizer_class"] = HUB_TOKENIZER_CLASS[family]
            config_file.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        paths[family] = path
    return paths
