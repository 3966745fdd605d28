"""Dia2 on ONNX Runtime, torch-free (docs/dia2.md): `Dia2(folder).generate(script, config=GenerationConfig())`."""

from dia_ort.dia2.model import Dia2, GenerationConfig, GenerationResult
from dia_ort.dia2.prefix import PrefixConfig, Speaker, Word
from dia_ort.dia2.sampling import SamplingConfig

__all__ = [
    "Dia2",
    "GenerationConfig",
    "GenerationResult",
    "PrefixConfig",
    "SamplingConfig",
    "Speaker",
    "Word",
]
