"""PromptEnhancer: one rewrite per task through the endpoint, with the cache, bounded retries and a raw fallback."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import openai

from bernini.prompt_enhancer.attachments import _MediaPlan, _plan_media
from bernini.prompt_enhancer.cache import _PromptCache, cache_key
from bernini.prompt_enhancer.errors import PromptEnhancerError
from bernini.prompt_enhancer.messages import (
    _BadAnswerError,
    _messages_for,
    _parse_answer,
)
from bernini.prompt_enhancer.settings import (
    _BASE_URL_ENVS,
    _KEY_ENVS,
    MAX_BACKOFF_S,
    NO_KEY_ERROR,
    PEResult,
    PESettings,
    PEStatus,
    _first_env,
    resolve_model,
)
from bernini.prompt_enhancer.templates import (
    TASK_TEMPLATES,
    TEMPLATE_VERSION,
    MediaPolicy,
    TaskTemplate,
)

logger = logging.getLogger(__package__)  # "bernini.prompt_enhancer" in every module, as log lines always read

MAX_COMPLETION_TOKENS = 8192
_RETRYABLE_4XX = frozenset({408, 409, 429})
_MAX_ERROR_CHARS = 500

ClientFactory = Callable[[str, "str | None", float], Any]


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _describe(exc: Exception, api_key: str) -> str:
    """A short, key-free description of a failed attempt."""
    detail = str(exc) if isinstance(exc, _BadAnswerError) else f"{type(exc).__name__}: {exc}"
    text = _redact(detail, api_key)
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _is_retryable(exc: Exception) -> bool:
    """Whether another attempt could succeed; bad requests and auth failures will not."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 or exc.status_code in _RETRYABLE_4XX
    return True


def backoff_delay(backoff_s: float, failed_attempts: int) -> float:
    """Seconds to wait after the n-th failed attempt: backoff_s, 2x, 4x, ... capped at 8 s."""
    return min(backoff_s * 2 ** (failed_attempts - 1), MAX_BACKOFF_S)


def _default_client_factory(api_key: str, base_url: str | None, timeout_s: float) -> openai.OpenAI:
    # The SDK's own retries are off: ours count attempts and also retry unusable answers.
    return openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=0)


class PromptEnhancer:
    """Rewrites prompts per task, with a disk cache, bounded retries and a raw-prompt fallback."""

    def __init__(self, settings: PESettings, client_factory: ClientFactory | None = None) -> None:
        self._model = resolve_model(settings.model)
        self.settings = dataclasses.replace(settings, model=self._model)
        self._client_factory = client_factory or _default_client_factory
        self._cache = _PromptCache(settings.cache_dir) if settings.cache_dir is not None else None

    def __repr__(self) -> str:
        return f"PromptEnhancer(settings={self.settings!r})"

    @property
    def model(self) -> str:
        return self._model

    def enhance(
        self,
        task_type: str,
        prompt: str,
        videos: Sequence[Path] = (),
        image: Path | None = None,
        images: Sequence[Path] = (),
    ) -> PEResult:
        """The prompt to render for `task_type`, rewritten by the model when possible.

        Endpoint failures fall back to the raw prompt (or raise PromptEnhancerError with
        on_error="fail"); unreadable media files raise ValueError/OSError, being the caller's input.
        """
        if not prompt.strip():
            logger.debug("empty prompt: nothing to enhance")
            return self._result(prompt, prompt, "skipped", 0)
        template = TASK_TEMPLATES.get(task_type)
        if template is None:
            logger.warning("prompt enhancer has no template for task_type %r; using the raw prompt", task_type)
            return self._result(prompt, prompt, "skipped", 0, f"unknown task_type {task_type!r}")
        plan = _plan_media(template.media, videos, image, images)
        if template.media is not MediaPolicy.NONE and not plan.files:
            logger.warning("task %s expects media for prompt enhancement but none was given", task_type)
        key = cache_key(task_type, self.model, prompt, plan.files)
        cached = self._cache.get(key) if self._cache else None
        if cached is not None:
            logger.info("prompt enhancer: cache hit for %s", task_type)
            return self._result(cached, prompt, "cached", 0)
        return self._enhance_uncached(task_type, template, prompt, plan, key)

    def _enhance_uncached(
        self, task_type: str, template: TaskTemplate, prompt: str, plan: _MediaPlan, key: str
    ) -> PEResult:
        api_key = _first_env(_KEY_ENVS)
        if api_key is None:
            return self._give_up(prompt, NO_KEY_ERROR, 0)
        messages = _messages_for(template, prompt, plan)
        answer, attempts, error = self._request_with_retries(api_key, messages, template.json_answer)
        if answer is None:
            return self._give_up(prompt, error, attempts)
        logger.info("prompt enhanced for %s with %s after %d attempt(s)", task_type, self.model, attempts)
        logger.debug("enhanced prompt: %s", answer)
        if self._cache:
            entry = {"prompt": answer, "original": prompt, "task_type": task_type, "model": self.model}
            self._cache.put(key, {**entry, "template_version": TEMPLATE_VERSION})
        return self._result(answer, prompt, "enhanced", attempts)

    def _request_with_retries(
        self, api_key: str, messages: list[dict[str, Any]], json_answer: bool
    ) -> tuple[str | None, int, str]:
        """(answer or None, attempts made, last error text)."""
        client = self._client_factory(api_key, _first_env(_BASE_URL_ENVS), self.settings.timeout_s)
        attempts_allowed = self.settings.max_attempts
        error = ""
        try:
            for attempt in range(1, attempts_allowed + 1):
                if attempt > 1:
                    time.sleep(backoff_delay(self.settings.backoff_s, attempt - 1))
                try:
                    return self._ask(client, messages, json_answer), attempt, ""
                except (openai.OpenAIError, _BadAnswerError) as exc:
                    error = _describe(exc, api_key)
                    logger.warning("prompt enhancer attempt %d/%d failed: %s", attempt, attempts_allowed, error)
                    if not _is_retryable(exc):
                        return None, attempt, error
        finally:
            _close_quietly(client)
        return None, attempts_allowed, error

    def _ask(self, client: Any, messages: list[dict[str, Any]], json_answer: bool) -> str:
        """One request; the parsed answer or an exception."""
        extra = {"response_format": {"type": "json_object"}} if json_answer else {}
        response = client.chat.completions.create(
            model=self.model,
            messages=messages,
            max_completion_tokens=MAX_COMPLETION_TOKENS,
            timeout=self.settings.timeout_s,
            **extra,
        )
        choices = getattr(response, "choices", None) or []
        content = choices[0].message.content if choices else None
        return _parse_answer(content, json_answer)

    def _give_up(self, prompt: str, error: str, attempts: int) -> PEResult:
        if self.settings.on_error == "fail":
            raise PromptEnhancerError(f"prompt enhancement failed after {attempts} attempt(s): {error}")
        logger.warning("prompt enhancement failed (%s); rendering with the raw prompt", error)
        return self._result(prompt, prompt, "fallback_raw", attempts, error)

    def _result(
        self, prompt: str, original: str, status: PEStatus, attempts: int, error: str | None = None
    ) -> PEResult:
        return PEResult(prompt, original, status, self.model, attempts, error)


def _close_quietly(client: Any) -> None:
    """Release the client's connections; a failure here must not mask the real outcome."""
    close = getattr(client, "close", None)
    if callable(close):
        try:
            close()
        except Exception as exc:  # noqa: BLE001 - cleanup only
            logger.debug("closing the prompt enhancer client failed: %s", type(exc).__name__)
