"""Visual-token compressors, all behind the contract in ``vtc.compressors.base``."""
from vtc.compressors.base import Compressor, LLMCompressor, NoCompression, PreLLMCompressor
from vtc.compressors.pool import AvgPool2d

__all__ = ["Compressor", "PreLLMCompressor", "LLMCompressor", "NoCompression", "AvgPool2d"]
