"""LoRAs for the experts: locate and hash the files, read any Wan layout, check shapes early, merge at load.

Exports what callers outside the package use, and the error a bad file raises.
"""

from bernini.lora.files import LoraRef, locate, parse_spec, resolve
from bernini.lora.formats import LoraFormatError, read_lora
from bernini.lora.merge import ExpertLoras, Merger, check, describe, prepare

__all__ = [
    "ExpertLoras", "LoraFormatError", "LoraRef", "Merger", "check", "describe", "locate", "parse_spec", "prepare",
    "read_lora", "resolve",
]
