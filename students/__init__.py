"""Student artifacts and runtime: GGUF export, quantization, the registry and ``ChatStudent``."""

from langchain_understudy.students.chat_models import ChatStudent, confidence_from_logprobs
from langchain_understudy.students.export import SUPPORTED_ARCHITECTURES, export_gguf
from langchain_understudy.students.quantize import QUANT_TYPES, quantize_gguf
from langchain_understudy.students.registry import StudentRegistry, StudentVersion, sha256_file

__all__ = [
    "QUANT_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "ChatStudent",
    "StudentRegistry",
    "StudentVersion",
    "confidence_from_logprobs",
    "export_gguf",
    "quantize_gguf",
    "sha256_file",
]
