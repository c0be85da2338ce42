"""The tests' registry of families and features: which family is tested with which feature, and why a family is
refused one, as the family layer says it (the message `finetune validate` prints).

The parity and feature tests take their cases from here (`tested`), and the support matrix of the documentation's
Model families page (docs/guides/model-families.md) is generated from here (`markdown`, checked by `tests/test_family_matrix.py`), so a cell marked supported is a case the suite
runs, and every other cell is a refusal with its reason.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

FAMILIES: tuple[str, ...] = (
    "bert", "distilbert", "big_bird", "roberta", "xlm-roberta", "deberta-v2", "electra", "modernbert", "eurobert",
)

TASK_KINDS = ("classification", "pair", "regression", "multi_label", "token_classification", "question_answering",
              "multiple_choice")
"""The parity cases of each family: the kinds of `tests.conftest.tiny_recipe` (pair: sentence-pair classification)."""

FEATURES: dict[str, tuple[str, str]] = {
    # feature: (what the docs call it, the test that exercises it)
    "classification": ("sentence classification", "tests/test_parity.py"),
    "pair": ("sentence-pair classification", "tests/test_parity.py"),
    "regression": ("regression", "tests/test_parity.py"),
    "multi_label": ("multi-label", "tests/test_parity.py"),
    "token_classification": ("NER (token classification)", "tests/test_parity.py"),
    "question_answering": ("extractive QA", "tests/test_parity.py"),
    "multiple_choice": ("multiple choice", "tests/test_parity.py"),
    "serving": ("predict, serve, file scoring: the evaluated answers", "tests/test_parity.py"),
    "calibration": ("calibration (temperature scaling)", "tests/test_parity.py"),
    "freeze": ("training.freeze N (embeddings and N layers) with layer_lr_decay and head_only_steps",
               "tests/test_family_features.py"),
    "pooling": ("training.freeze encoder (outputs cached) with model.pooling mean", "tests/test_family_features.py"),
    "lora": ("LoRA with the family's default targets", "tests/test_family_features.py"),
    "pretrain": ("finetune pretrain (masked positions only), then fine-tuning its output", "tests/test_family_features.py"),
    "fewer_layers": ("convert --to fewer-layers, then distillation from the teacher", "tests/test_family_features.py"),
    "onnx": ("ONNX export fp32 / int8", "tests/test_family_features.py"),
}

TASK_OF_KIND = {"pair": "classification"}


def small_config(family: str):
    """A two-layer config of each family, built like its tiny checkpoint (no weights: structure only)."""
    import transformers

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=120)
    return {
        "bert": lambda: transformers.BertConfig(**small),
        "distilbert": lambda: transformers.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
        "big_bird": lambda: transformers.BigBirdConfig(**small, attention_type="original_full", block_size=8,
                                                       num_random_blocks=2, pad_token_id=0, bos_token_id=2,
                                                       eos_token_id=3, sep_token_id=3),
        "roberta": lambda: transformers.RobertaConfig(**small, max_position_embeddings=514, pad_token_id=1),
        "xlm-roberta": lambda: transformers.XLMRobertaConfig(**small, max_position_embeddings=514, pad_token_id=1),
        "deberta-v2": lambda: transformers.DebertaV2Config(
            **small, max_position_embeddings=512, relative_attention=True, position_buckets=32,
            pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True,
            type_vocab_size=0),
        "electra": lambda: transformers.ElectraConfig(**small, embedding_size=16),
        "modernbert": lambda: transformers.ModernBertConfig(**small, max_position_embeddings=512,
                                                            global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1,
                                                            eos_token_id=2, cls_token_id=1, sep_token_id=2),
        "eurobert": lambda: transformers.EuroBertConfig(**small, max_position_embeddings=512, num_key_value_heads=2,
                                                        pad_token_id=1, bos_token_id=2, eos_token_id=3, mask_token_id=4),
    }[family]()


RECIPE_MODEL = {"big_bird": {"attention_type": "original_full"}}
"""What a recipe must say beside the checkpoint for a family (BigBird: its attention type), as the tests' recipes do."""


def _recipe(family: str, **model: object) -> SimpleNamespace:
    from finetune.config.recipe import ModelSection, TrainingSection

    return SimpleNamespace(model=ModelSection(checkpoint="tiny", **RECIPE_MODEL.get(family, {}), **model),
                           training=TrainingSection())


def refusal(family: str, feature: str) -> str | None:
    """Why the family layer refuses `feature` for `family` (what `finetune validate` says), or None."""
    from finetune.config.recipe import AdapterSection, TrainingSection
    from finetune.families import FAMILIES as REGISTERED
    from finetune.families.support import recipe_problems
    from finetune.tasks import get_task

    config = small_config(family)
    registered = REGISTERED[family]
    if feature in TASK_KINDS:
        problems = recipe_problems(config, _recipe(family), get_task(TASK_OF_KIND.get(feature, feature)))
        return problems[0] if problems else None
    classify = get_task("classification")
    if feature == "freeze":
        recipe = _recipe(family)
        recipe.training = TrainingSection(freeze=1, layer_lr_decay=0.8)
        problems = recipe_problems(config, recipe, classify)
        return problems[0] if problems else None
    if feature == "lora":
        recipe = _recipe(family, adapter=AdapterSection())
        problems = recipe_problems(config, recipe, classify)
        return problems[0] if problems else None
    if feature == "pooling":
        problems = recipe_problems(config, _recipe(family, pooling="mean"), classify)
        return problems[0] if problems else None
    if feature == "pretrain":
        problems = recipe_problems(config, _recipe(family), get_task("masked_lm"))
        if problems:
            return problems[0]
        return None if registered.mlm_head else f"{family}: its masked-LM head is not known to finetune"
    if feature == "onnx":
        return registered.export_problem(config)
    return None


def families_for(feature: str) -> list[str]:
    """The families the suite exercises `feature` with: every family the family layer does not refuse it."""
    return [family for family in FAMILIES if refusal(family, feature) is None]


def markdown() -> str:
    """The docs' support matrix: one row per feature, one column per family; a refusal is a numbered note with the
    reason the family layer gives."""
    notes: list[str] = []
    lines = ["| feature | " + " | ".join(FAMILIES) + " |", "|---|" + "---|" * len(FAMILIES)]
    for feature, (label, _) in FEATURES.items():
        cells = []
        for family in FAMILIES:
            reason = refusal(family, feature)
            if reason is None:
                cells.append("✓")
            else:
                if reason not in notes:
                    notes.append(reason)
                cells.append(f"no ({notes.index(reason) + 1})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- ({i}) {reason}" for i, reason in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


MATRIX_START = "<!-- family matrix: generated from tests/family_matrix.py by `python -m tests.family_matrix` -->"
MATRIX_END = "<!-- end of family matrix -->"


MATRIX_PAGE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "model-families.md"
"""The page the matrix is generated into, between MATRIX_START and MATRIX_END."""


def write_matrix(page: Path = MATRIX_PAGE) -> bool:
    """Put the generated matrix between the page's markers; returns whether the file changed."""
    text = page.read_text(encoding="utf-8")
    before, rest = text.split(MATRIX_START, 1)
    _, after = rest.split(MATRIX_END, 1)
    new = f"{before}{MATRIX_START}\n{markdown()}{MATRIX_END}{after}"
    if new != text:
        page.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    changed = write_matrix()
    print(f"{MATRIX_PAGE.relative_to(MATRIX_PAGE.parents[2])}: family matrix " + ("rewritten" if changed else "was up to date"))
