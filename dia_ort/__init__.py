"""Dia text-to-dialogue on ONNX Runtime, without torch."""
