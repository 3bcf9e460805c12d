"""Rewrite user prompts through an OpenAI-compatible chat-completions endpoint (--use_pe)."""

from bernini.prompt_enhancer.attachments import FRAMES_PER_VIDEO
from bernini.prompt_enhancer.cache import cache_key
from bernini.prompt_enhancer.enhancer import (
    MAX_COMPLETION_TOKENS,
    ClientFactory,
    PromptEnhancer,
    PromptEnhancerError,
    backoff_delay,
)
from bernini.prompt_enhancer.errors import PEConfigError
from bernini.prompt_enhancer.messages import build_messages
from bernini.prompt_enhancer.settings import (
    DEFAULT_MODEL,
    MAX_BACKOFF_S,
    NO_KEY_ERROR,
    ON_ERROR_CHOICES,
    PEResult,
    PESettings,
    PEStatus,
    default_cache_dir,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL", "FRAMES_PER_VIDEO", "MAX_BACKOFF_S", "MAX_COMPLETION_TOKENS", "NO_KEY_ERROR", "ON_ERROR_CHOICES",
    "ClientFactory", "PEConfigError", "PEResult", "PESettings", "PEStatus", "PromptEnhancer", "PromptEnhancerError", "backoff_delay",
    "build_messages", "cache_key", "default_cache_dir", "resolve_model",
]
