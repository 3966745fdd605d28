"""Dia and Dia2 text-to-dialogue on ONNX Runtime, without torch."""

from dia_ort.dia2 import Dia2
from dia_ort.engine import _get_default_device
from dia_ort.model import DEFAULT_SAMPLE_RATE, SAMPLE_RATE_RATIO, Dia
from dia_ort.options import GenerationOptions
from dia_ort.sampling import _sample_next_token

__all__ = [
    "DEFAULT_SAMPLE_RATE",
    "SAMPLE_RATE_RATIO",
    "Dia",
    "Dia2",
    "GenerationOptions",
    "_get_default_device",
    "_sample_next_token",
]
