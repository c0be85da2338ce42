"""serving: the HTTP inference service for models trained by finetune."""
