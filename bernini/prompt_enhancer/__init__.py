"""Rewrite user prompts through an OpenAI-compatible chat-completions endpoint (--use_pe).

Exports what callers outside the package use, and its errors; the instruction texts are in
`templates`, the other parts in their modules (attachments, messages, cache, settings, enhancer).
"""

from bernini.prompt_enhancer.enhancer import PromptEnhancer, backoff_delay
from bernini.prompt_enhancer.errors import PEConfigError, PromptEnhancerError
from bernini.prompt_enhancer.messages import build_messages
from bernini.prompt_enhancer.settings import DEFAULT_MODEL, NO_KEY_ERROR, PEResult, PESettings

__all__ = [
    "DEFAULT_MODEL", "NO_KEY_ERROR", "PEConfigError", "PEResult", "PESettings", "PromptEnhancer", "PromptEnhancerError",
    "backoff_delay", "build_messages",
]
