"""Exports of trained models for other runtimes (ONNX Runtime)."""
