"""Rewrite user prompts through an OpenAI-compatible chat-completions endpoint (--use_pe)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import openai
from PIL import Image, UnidentifiedImageError

from bernini.pe_templates import TASK_TEMPLATES, TEMPLATE_VERSION, MediaPolicy, TaskTemplate, render_user_text

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-5.4-2026-03-05"
MAX_COMPLETION_TOKENS = 8192
FRAMES_PER_VIDEO = 3
MAX_BACKOFF_S = 8.0
ON_ERROR_CHOICES = ("raw", "fail")
NO_KEY_ERROR = "no API key: set BERNINI_PE_API_KEY or OPENAI_API_KEY"

_KEY_ENVS = ("BERNINI_PE_API_KEY", "OPENAI_API_KEY")
_BASE_URL_ENVS = ("BERNINI_PE_BASE_URL", "OPENAI_BASE_URL")
_MODEL_ENV = "BERNINI_PE_MODEL"
_CACHE_ENV = "BERNINI_PE_CACHE"
_RETRYABLE_4XX = frozenset({408, 409, 429})
_MAX_ERROR_CHARS = 500

PEStatus = Literal["enhanced", "cached", "fallback_raw", "skipped"]
ClientFactory = Callable[[str, "str | None", float], Any]


class PromptEnhancerError(RuntimeError):
    """Prompt enhancement failed and the settings say not to fall back to the raw prompt."""


class _BadAnswerError(ValueError):
    """The endpoint answered, but with nothing usable."""


# ---------------------------------------------------------------- settings and results


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
    on_error: str = "raw"  # "raw": fall back to the user's prompt; "fail": raise PromptEnhancerError
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


# ---------------------------------------------------------------- media


@dataclass(frozen=True)
class _MediaPlan:
    """The files a task shows to the model: frames of `videos` first, then `images`."""

    videos: tuple[Path, ...] = ()
    frames_per_video: int = FRAMES_PER_VIDEO
    images: tuple[Path, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        return self.videos + self.images


def _plan_media(
    policy: MediaPolicy, videos: Sequence[Path], image: Path | None, images: Sequence[Path]
) -> _MediaPlan:
    """Pick, per the task's policy, which of the caller's files are sent."""
    video_paths = tuple(Path(v) for v in videos)
    image_paths = tuple(Path(p) for p in ([image] if image is not None else []) + list(images))
    if policy is MediaPolicy.NONE:
        return _MediaPlan()
    if policy is MediaPolicy.VIDEO_FRAMES:
        return _MediaPlan(videos=video_paths)
    if policy is MediaPolicy.IMAGES:
        return _MediaPlan(images=image_paths)
    if policy is MediaPolicy.VIDEO_FRAMES_THEN_IMAGES:
        return _MediaPlan(videos=video_paths, images=image_paths)
    if image_paths or not video_paths:  # IMAGES_OR_FIRST_FRAME
        return _MediaPlan(images=image_paths)
    return _MediaPlan(videos=video_paths[:1], frames_per_video=1)


def _frame_indices(total: int, count: int) -> list[int]:
    """Evenly spread indices from the first to the last frame (first/middle/last for 3)."""
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def _video_stream(container: Any, path: Path) -> Any:
    if not container.streams.video:
        raise ValueError(f"{path}: no video stream")
    return container.streams.video[0]


def _count_frames(path: Path) -> int:
    """Frames in the first video stream, decoding when the container does not say."""
    import av  # heavy import, only needed for video tasks

    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        if stream.frames > 0:
            return stream.frames
        return sum(1 for _ in container.decode(stream))


def _read_video_frames(path: Path, count: int) -> list[bytes]:
    """`count` evenly spread frames of a video, PNG-encoded."""
    import av  # heavy import, only needed for video tasks

    total = _count_frames(path)
    if total < 1:
        raise ValueError(f"{path}: video has no frames")
    wanted = _frame_indices(total, count)
    picked: dict[int, bytes] = {}
    with av.open(str(path)) as container:
        frame = None
        for index, frame in enumerate(container.decode(_video_stream(container, path))):
            if index in wanted:
                picked[index] = _encode_frame(frame)
            if index >= wanted[-1]:
                break
        if frame is None:
            raise ValueError(f"{path}: could not decode any frame")
        # Container frame counts can overstate; the real last frame stands in for indices past it.
        tail = picked.get(wanted[-1]) or _encode_frame(frame)
    return [picked.get(i, tail) for i in wanted]


def _encode_frame(frame: Any) -> bytes:
    """A decoded PyAV frame as upright PNG bytes."""
    return _png_bytes(_upright(frame.to_image(), frame.rotation))


def _upright(image: Image.Image, rotation_ccw: float) -> Image.Image:
    """Undo the display-matrix rotation (PyAV reports degrees counter-clockwise) of a frame."""
    # Phone videos are often stored sideways; the model should see them the way players show them.
    quarter_turns = round(rotation_ccw / 90) % 4
    if quarter_turns == 0:
        return image
    turns = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
    return image.transpose(turns[quarter_turns - 1])


def _png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _sniff_mime(data: bytes) -> str | None:
    """The image MIME type from magic bytes, or None for formats the API does not take."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _image_payload(path: Path) -> tuple[str, bytes]:
    """(MIME type, bytes) of an image file, judged by content; other formats become PNG."""
    data = path.read_bytes()
    mime = _sniff_mime(data)
    if mime is not None:
        return mime, data
    try:
        with Image.open(io.BytesIO(data)) as img:
            return "image/png", _png_bytes(img.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not a readable image") from None


def _load_media(plan: _MediaPlan) -> list[tuple[str, bytes]]:
    """(MIME type, bytes) of every image to send, in order."""
    frames = [
        ("image/png", frame) for video in plan.videos for frame in _read_video_frames(video, plan.frames_per_video)
    ]
    return frames + [_image_payload(path) for path in plan.images]


# ---------------------------------------------------------------- messages


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


# ---------------------------------------------------------------- answers and errors


_FENCE_RE = re.compile(r"^```[\w-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)
_QUOTE_PAIRS = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"))


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


# ---------------------------------------------------------------- cache


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(task_type: str, model: str, prompt: str, media_files: Sequence[Path]) -> str:
    """sha256 over the task, model, instruction texts and version, prompt and media bytes."""
    template = _template_for(task_type)
    payload = {
        "task_type": task_type,
        "model": model,
        "template_version": TEMPLATE_VERSION,
        "system_prompt": template.system_prompt,
        "user_template": template.user_template,
        "prompt": prompt,
        "media": [_file_sha256(Path(p)) for p in media_files],
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _PromptCache:
    """One JSON file per key; unreadable entries count as misses, write errors are only logged."""

    directory: Path

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        try:
            prompt = json.loads(path.read_text(encoding="utf-8"))["prompt"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable prompt cache entry %s: %s", path, exc)
            return None
        return prompt if isinstance(prompt, str) and prompt else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write_atomic(self._path(key), json.dumps(entry, ensure_ascii=False, indent=1))
        except OSError as exc:
            logger.warning("could not write prompt cache entry in %s: %s", self.directory, exc)

    def _write_atomic(self, path: Path, text: str) -> None:
        # Temp file in the same directory + os.replace: readers never see a half-written entry.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------- enhancer


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
