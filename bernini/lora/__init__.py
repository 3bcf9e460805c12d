"""LoRAs for the experts: locate and hash the files, read any Wan layout, check shapes early, merge at load."""

from bernini.lora.files import EXPERTS_OF_FLAG, LoraRef, locate, parse_spec, resolve, sha256_of
from bernini.lora.formats import Full, LoraFormatError, LowRank, detect_layout, read_lora
from bernini.lora.merge import ExpertLoras, Merger, check, describe, model_shapes, prepare

__all__ = [
    "EXPERTS_OF_FLAG", "ExpertLoras", "Full", "LoraFormatError", "LoraRef", "LowRank", "Merger", "check", "describe",
    "detect_layout", "locate", "model_shapes", "parse_spec", "prepare", "read_lora", "resolve", "sha256_of",
]
