"""finetune: fine-tune BERT-family encoders from YAML recipes, with Accelerate and MLflow."""

__version__ = "0.1.0"

