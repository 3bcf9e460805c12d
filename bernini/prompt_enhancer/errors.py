"""The prompt enhancer's errors: a failed rewrite (a failed case) and a configuration that cannot work (no run)."""

from __future__ import annotations

from bernini.cases import CaseError


class PromptEnhancerError(CaseError, RuntimeError):
    """Prompt enhancement failed and the settings say not to fall back to the raw prompt.

    A CaseError, so a batch reports it as that case's one-line error (no traceback) and goes on;
    still a RuntimeError for callers that caught it as one.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # one line in logs and summary.json


class PEConfigError(ValueError):
    """--use_pe cannot work as configured (no key, a bad URL...); raised before any model loads."""
