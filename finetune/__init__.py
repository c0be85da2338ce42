"""finetune: fine-tune BERT-family encoders from YAML recipes, with Accelerate and MLflow."""

__version__ = "0.1.0"

# Before anything imports torch: OpenMP reads its wait policy once, when it loads.
from finetune.threads import configure_openmp  # noqa: E402

configure_openmp()
