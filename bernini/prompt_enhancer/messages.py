"""The chat messages sent for a task, and the rewritten prompt parsed out of the model's answer."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bernini.prompt_enhancer.attachments import _load_media, _MediaPlan, _plan_media
from bernini.prompt_enhancer.templates import TASK_TEMPLATES, TaskTemplate, render_user_text

_FENCE_RE = re.compile(r"^```[\w-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)
_QUOTE_PAIRS = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"))


class _BadAnswerError(ValueError):
    """The endpoint answered, but with nothing usable."""


def _template_for(task_type: str) -> TaskTemplate:
    try:
        return TASK_TEMPLATES[task_type]
    except KeyError:
        raise ValueError(f"unknown task_type {task_type!r}; expected one of {sorted(TASK_TEMPLATES)}") from None


def _user_content(text: str, media: Sequence[tuple[str, bytes]]) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for i, (mime, data) in enumerate(media):
        url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        content.append({"type": "text", "text": f"\n[Image {i}]:"})
        content.append({"type": "image_url", "image_url": {"url": url}})
    return content


def _messages_for(template: TaskTemplate, prompt: str, plan: _MediaPlan) -> list[dict[str, Any]]:
    media = _load_media(plan)
    text = render_user_text(template.user_template, prompt, image_num=len(media))
    return [
        {"role": "system", "content": template.system_prompt},
        {"role": "user", "content": _user_content(text, media)},
    ]


def build_messages(
    task_type: str,
    prompt: str,
    videos: Sequence[Path] = (),
    image: Path | None = None,
    images: Sequence[Path] = (),
) -> tuple[list[dict[str, Any]], bool]:
    """The chat messages for a task and whether the answer is requested as a JSON object.

    Reads the media files (3 PNG frames per video, images with their true MIME type) but sends
    nothing. Raises ValueError for an unknown task_type.
    """
    template = _template_for(task_type)
    plan = _plan_media(template.media, videos, image, images)
    return _messages_for(template, prompt, plan), template.json_answer


def _strip_fences(text: str) -> str:
    match = _FENCE_RE.match(text)
    return match.group(1).strip() if match else text


def _strip_quotes(text: str) -> str:
    """Drop one pair of quotes wrapping the whole answer, but not quotes inside it."""
    for left, right in _QUOTE_PAIRS:
        inner = text[1:-1]
        if len(text) >= 2 and text[0] == left and text[-1] == right and left not in inner and right not in inner:
            return inner.strip()
    return text


def _parse_answer(content: str | None, json_answer: bool) -> str:
    """The rewritten prompt inside a model answer; _BadAnswerError when there is none."""
    text = _strip_fences((content or "").strip())
    if not text:
        raise _BadAnswerError("empty answer")
    if not json_answer:
        answer = _strip_quotes(text)
        if not answer:
            raise _BadAnswerError("empty answer")
        return answer
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadAnswerError(f"malformed JSON answer ({exc.msg})") from None
    rewritten = data.get("rewritten_text") if isinstance(data, dict) else None
    if not isinstance(rewritten, str) or not rewritten.strip():
        raise _BadAnswerError('JSON answer lacks a non-empty "rewritten_text" string')
    return rewritten.strip()
