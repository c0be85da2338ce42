"""Evaluating a trained model on any data, scoring whole files, finding label errors, `evaluate` metrics."""
