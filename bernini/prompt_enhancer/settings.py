"""How to call the prompt-rewriting endpoint (models, retries, cache, environment) and what a rewrite returns."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from bernini.prompt_enhancer.errors import PEConfigError
from bernini.prompt_enhancer.templates import TEMPLATE_VERSION

DEFAULT_MODEL = "gpt-5.4-2026-03-05"
MAX_BACKOFF_S = 8.0
ON_ERROR_CHOICES = ("raw", "fail")
NO_KEY_ERROR = "no API key: set BERNINI_PE_API_KEY or OPENAI_API_KEY"

_KEY_ENVS = ("BERNINI_PE_API_KEY", "OPENAI_API_KEY")
_BASE_URL_ENVS = ("BERNINI_PE_BASE_URL", "OPENAI_BASE_URL")
_MODEL_ENV = "BERNINI_PE_MODEL"
_CACHE_ENV = "BERNINI_PE_CACHE"

PEStatus = Literal["enhanced", "cached", "fallback_raw", "skipped"]


def _first_env(names: Sequence[str]) -> str | None:
    """The first of `names` set to a non-blank value."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def resolve_model(model: str | None = None) -> str:
    """The model to use: the explicit argument, else $BERNINI_PE_MODEL, else DEFAULT_MODEL."""
    return model or _first_env((_MODEL_ENV,)) or DEFAULT_MODEL


def default_cache_dir() -> Path:
    """$BERNINI_PE_CACHE, else ~/.cache/bernini/prompt_enhancer."""
    override = _first_env((_CACHE_ENV,))
    return Path(override).expanduser() if override else Path.home() / ".cache" / "bernini" / "prompt_enhancer"


@dataclass(frozen=True)
class PESettings:
    """How to call the endpoint. Holds no API key: that is read from the environment per call.

    `cache_dir=None` disables the cache; `from_env` fills in the default location.
    """

    model: str | None = None
    timeout_s: float = 60.0
    max_attempts: int = 4
    backoff_s: float = 1.0  # doubled after every failed attempt, capped at MAX_BACKOFF_S
    on_error: str = "raw"  # "raw": fall back to the user's prompt; "fail": raise PromptEnhancerError (a failed case)
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {self.on_error!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if not self.backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {self.backoff_s!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))  # accept str paths

    def check_ready(self) -> None:
        """PEConfigError unless a request could be made: key present, URL and model usable, cache a folder.

        Run before any model loads, so `--use_pe` never fails once per case after the 11 GB encoder loaded.
        The key itself is only checked for presence and never appears in a message.
        """
        if _first_env(_KEY_ENVS) is None:
            raise PEConfigError(f"--use_pe: {NO_KEY_ERROR} (or run without --use_pe)")
        base_url = _first_env(_BASE_URL_ENVS)
        if base_url is not None:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                env = next(name for name in _BASE_URL_ENVS if os.environ.get(name, "").strip())
                raise PEConfigError(f"--use_pe: ${env} must be an http(s) URL such as https://api.openai.com/v1, got {base_url!r}")
        if self.model is not None and not self.model.strip():
            raise PEConfigError(f"--use_pe: the model name is blank; pass --pe_model NAME or set ${_MODEL_ENV} (default {DEFAULT_MODEL})")
        if self.cache_dir is not None:
            blocker = next((p for p in [self.cache_dir, *self.cache_dir.parents] if p.exists()), None)
            if blocker is not None and not blocker.is_dir():
                raise PEConfigError(f"--use_pe: the prompt cache {self.cache_dir} cannot be a folder because {blocker} is a file; set ${_CACHE_ENV} to a folder")

    @classmethod
    def from_env(cls, model: str | None = None, **overrides: Any) -> PESettings:
        """Settings with the model resolved (argument > $BERNINI_PE_MODEL > default) and the
        cache in its default place unless `cache_dir` is given (None turns caching off)."""
        overrides.setdefault("cache_dir", default_cache_dir())
        return cls(model=resolve_model(model), **overrides)


@dataclass(frozen=True)
class PEResult:
    """The prompt to render with, and how it was obtained."""

    prompt: str
    original: str
    status: PEStatus
    model: str
    attempts: int
    error: str | None = None

    def to_sidecar(self) -> dict[str, Any]:
        """A JSON-ready record for the output's metadata sidecar (never holds the API key)."""
        return {**dataclasses.asdict(self), "template_version": TEMPLATE_VERSION}
