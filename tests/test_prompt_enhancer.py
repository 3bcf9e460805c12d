"""Tests for bernini.prompt_enhancer against a real loopback HTTP server."""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import av
import numpy as np
import pytest
from media_files import encode_video
from openai_stub import RecordedRequest, StubServer, answer, delayed, empty, http_error, malformed_json
from PIL import Image

from bernini.prompt_enhancer import (
    DEFAULT_MODEL,
    NO_KEY_ERROR,
    PEResult,
    PESettings,
    PromptEnhancer,
    PromptEnhancerError,
    backoff_delay,
    build_messages,
    templates,
)

TEST_KEY = "sk-test-key"
SENTINEL = "sk-SENTINEL-abc123"
FRAME_LEVELS = [i * 28 for i in range(9)]  # grey level of each frame of the test video
JSON_TASKS = {"r2v", "r2i", "rv2v", "vr2v", "vrc2v"}

# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def pe_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A clean environment: no stray keys, URLs, models or cache location from the host."""
    for name in ("BERNINI_PE_API_KEY", "OPENAI_API_KEY", "BERNINI_PE_BASE_URL", "OPENAI_BASE_URL", "BERNINI_PE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BERNINI_PE_CACHE", str(tmp_path / "env-cache"))


@pytest.fixture
def server_env(stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> StubServer:
    monkeypatch.setenv("BERNINI_PE_API_KEY", TEST_KEY)
    monkeypatch.setenv("BERNINI_PE_BASE_URL", stub.base_url)
    return stub


def make_enhancer(tmp_path: Path, **overrides: Any) -> PromptEnhancer:
    fields: dict[str, Any] = dict(
        model="test-model", timeout_s=5.0, max_attempts=3, backoff_s=0.01, cache_dir=tmp_path / "cache"
    )
    return PromptEnhancer(PESettings(**{**fields, **overrides}))


def write_video(path: Path, levels: list[int] = FRAME_LEVELS) -> Path:
    """A tiny mp4 whose i-th frame is flat grey at levels[i]."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_image(path: Path, fmt: str, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (16, 16), colour).save(path, format=fmt)
    return path


@pytest.fixture
def video(tmp_path: Path) -> Path:
    return write_video(tmp_path / "clip.mp4")


@pytest.fixture
def jpg(tmp_path: Path) -> Path:
    return write_image(tmp_path / "source.jpg", "JPEG", (200, 30, 30))


@pytest.fixture
def png(tmp_path: Path) -> Path:
    return write_image(tmp_path / "ref.png", "PNG", (30, 30, 200))


def user_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body["messages"][1]["content"]


def image_urls(body: dict[str, Any]) -> list[str]:
    return [part["image_url"]["url"] for part in user_parts(body) if part["type"] == "image_url"]


def mime_of(url: str) -> str:
    return url.split(";", 1)[0].removeprefix("data:")


def bytes_of(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


def grey_level(url: str) -> int:
    return int(Image.open(io.BytesIO(bytes_of(url))).convert("L").getpixel((16, 16)))


def assert_frame_levels(urls: list[str], expected: list[int]) -> None:
    assert [mime_of(u) for u in urls] == ["image/png"] * len(expected)
    for url, level in zip(urls, expected):
        assert abs(grey_level(url) - level) <= 6


def only_request(stub: StubServer) -> RecordedRequest:
    assert len(stub.requests) == 1
    return stub.requests[0]


# ---------------------------------------------------------------- per-task requests


def test_t2v_request_and_plain_answer(server_env: StubServer, tmp_path: Path) -> None:
    server_env.push(answer('  "A red fox trots through fresh snow at dawn."  '))
    result = make_enhancer(tmp_path).enhance("t2v", "a fox in snow")
    expected = PEResult("A red fox trots through fresh snow at dawn.", "a fox in snow", "enhanced", "test-model", 1)
    assert result == expected
    request = only_request(server_env)
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {TEST_KEY}"
    body = request.body
    assert body["model"] == "test-model" and body["max_completion_tokens"] == 8192
    assert "response_format" not in body
    system = body["messages"][0]
    assert system["role"] == "system" and "film director" in system["content"]
    assert "60 to 200 words" in system["content"] and "camera moves" in system["content"]
    assert body["messages"][1]["role"] == "user"
    assert user_parts(body) == [{"type": "text", "text": "a fox in snow"}]


def test_t2i_uses_still_image_rewriter(server_env: StubServer, tmp_path: Path) -> None:
    server_env.push(answer("A lighthouse at dusk."))
    assert make_enhancer(tmp_path).enhance("t2i", "lighthouse").prompt == "A lighthouse at dusk."
    system = only_request(server_env).body["messages"][0]["content"]
    assert "single still image" in system and "no motion and no camera movement" in system
    assert system != templates.T2V_SYSTEM_PROMPT


def test_v2v_sends_first_middle_last_frame_of_each_video(server_env: StubServer, tmp_path: Path, video: Path) -> None:
    second = write_video(tmp_path / "second.mp4", levels=[250, 200, 150, 100, 50])
    server_env.push(answer("Replace the sky with a sunset."))
    result = make_enhancer(tmp_path).enhance("v2v", "sunset sky", videos=[video, second])
    assert result.status == "enhanced"
    body = only_request(server_env).body
    assert body["messages"][0]["content"] == "You are a helpful assistant."
    parts = user_parts(body)
    text = parts[0]["text"]
    assert "video-to-video editing model" in text and "Concretization" in text and "subtitle removal" in text
    assert text.rstrip().endswith("Output only the final enhanced English prompt, with no explanation.")
    assert "User request: sunset sky" in text
    assert [p["text"] for p in parts[1::2]] == [f"\n[Image {i}]:" for i in range(6)]
    assert all(p["type"] == "image_url" for p in parts[2::2])
    assert_frame_levels(image_urls(body), [0, 111, 223, 250, 150, 50])


def test_i2i_sends_source_then_references_with_true_mime(
    server_env: StubServer, tmp_path: Path, jpg: Path, png: Path
) -> None:
    server_env.push(answer("Relight the scene as night."))
    make_enhancer(tmp_path).enhance("i2i", "make it night", image=jpg, images=[png])
    body = only_request(server_env).body
    assert "image editing model" in user_parts(body)[0]["text"] and "outpaint" in user_parts(body)[0]["text"]
    urls = image_urls(body)
    assert [mime_of(u) for u in urls] == ["image/jpeg", "image/png"]
    assert [bytes_of(u) for u in urls] == [jpg.read_bytes(), png.read_bytes()]


def test_mime_type_comes_from_bytes_not_name(tmp_path: Path) -> None:
    jpeg_named_png = write_image(tmp_path / "liar.png", "JPEG", (1, 2, 3))
    bmp = write_image(tmp_path / "plain.bmp", "BMP", (9, 9, 9))
    messages, _ = build_messages("r2i", "x", images=[jpeg_named_png, bmp])
    urls = [p["image_url"]["url"] for p in messages[1]["content"] if p["type"] == "image_url"]
    assert [mime_of(u) for u in urls] == ["image/jpeg", "image/png"]
    assert Image.open(io.BytesIO(bytes_of(urls[1]))).format == "PNG"  # re-encoded, not mislabelled


def test_ads2v_sends_frames_of_each_video(server_env: StubServer, tmp_path: Path, video: Path) -> None:
    server_env.push(answer("Add a soda poster on the bus shelter."))
    result = make_enhancer(tmp_path).enhance("ads2v", "soda brand", videos=[video, video])
    assert result.prompt == "Add a soda poster on the bus shelter."
    body = only_request(server_env).body
    assert "coffee-brand poster on the second-floor wall" in user_parts(body)[0]["text"]
    assert_frame_levels(image_urls(body), [0, 111, 223] * 2)


def test_r2v_json_answer_with_numbered_references(server_env: StubServer, tmp_path: Path, jpg: Path, png: Path) -> None:
    server_env.push(answer('{"rewritten_text": "  Feature image0. Generate a video where the cat jumps.  "}'))
    result = make_enhancer(tmp_path).enhance("r2v", "cat jumps", images=[jpg, png])
    assert result.prompt == "Feature image0. Generate a video where the cat jumps."
    body = only_request(server_env).body
    assert body["response_format"] == {"type": "json_object"}
    text = user_parts(body)[0]["text"]
    assert "You are given 2 reference" in text and "{image_num}" not in text
    assert '"Generate a video where"' in text and "rewritten_text" in text
    assert [mime_of(u) for u in image_urls(body)] == ["image/jpeg", "image/png"]


def test_rv2v_sends_source_frames_then_references(
    server_env: StubServer, tmp_path: Path, video: Path, png: Path
) -> None:
    server_env.push(answer('```json\n{"rewritten_text": "Add the hat from image0 to the man."}\n```'))
    result = make_enhancer(tmp_path).enhance("rv2v", "add the hat", videos=[video], images=[png])
    assert result.prompt == "Add the hat from image0 to the man."
    body = only_request(server_env).body
    assert body["response_format"] == {"type": "json_object"}
    text = user_parts(body)[0]["text"]
    assert "Do not use parentheses." in text and "Adding is not replacing" in text and "12. Write in English." in text
    urls = image_urls(body)
    assert_frame_levels(urls[:3], [0, 111, 223])
    assert bytes_of(urls[3]) == png.read_bytes()


@pytest.mark.parametrize("task", sorted(templates.TASK_TEMPLATES))
def test_json_mode_exactly_for_reference_tasks(task: str) -> None:
    _, json_mode = build_messages(task, "prompt")
    assert json_mode == (task in JSON_TASKS)


def test_i2v_uses_images_else_first_video_frame(video: Path, jpg: Path, png: Path) -> None:
    messages, _ = build_messages("i2v", "walk", videos=[video], image=jpg, images=[png])
    urls = [p["image_url"]["url"] for p in messages[1]["content"] if p["type"] == "image_url"]
    assert [mime_of(u) for u in urls] == ["image/jpeg", "image/png"]
    assert "given 2 image(s)" in messages[1]["content"][0]["text"]
    messages, _ = build_messages("i2v", "walk", videos=[video])
    urls = [p["image_url"]["url"] for p in messages[1]["content"] if p["type"] == "image_url"]
    assert_frame_levels(urls, [0])


def test_vi2v_mentions_propagation_string(video: Path, jpg: Path) -> None:
    messages, json_mode = build_messages("vi2v", "propagate", videos=[video], image=jpg)
    assert "edit the video following the first frame." in messages[1]["content"][0]["text"]
    assert not json_mode and len(messages[1]["content"]) == 1 + 2 * 4


def test_frames_found_when_container_has_no_frame_count(tmp_path: Path) -> None:
    mkv = write_video(tmp_path / "clip.mkv")  # Matroska does not store a frame count
    with av.open(str(mkv)) as container:
        assert container.streams.video[0].frames == 0
    messages, _ = build_messages("v2v", "x", videos=[mkv])
    urls = [p["image_url"]["url"] for p in messages[1]["content"] if p["type"] == "image_url"]
    assert_frame_levels(urls, [0, 111, 223])


def test_unreadable_media_raise_value_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        build_messages("r2v", "x", images=[junk])


def test_build_messages_rejects_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown task_type 'nope'"):
        build_messages("nope", "x")


def test_prompt_braces_are_kept_verbatim(tmp_path: Path) -> None:
    messages, _ = build_messages("r2v", "say {image_num} and {prompt}", images=[])
    assert "User request: say {image_num} and {prompt}" in messages[1]["content"][0]["text"]


# ---------------------------------------------------------------- answer clean-up


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("```\nA cat naps.\n```", "A cat naps."),
        ("```text\n'A cat naps.'\n```", "A cat naps."),
        ("\u201cA cat naps.\u201d", "A cat naps."),
        ('"Big" cat and "small" cat', '"Big" cat and "small" cat'),
    ],
)
def test_plain_answers_are_unwrapped(server_env: StubServer, tmp_path: Path, raw: str, expected: str) -> None:
    server_env.push(answer(raw))
    assert make_enhancer(tmp_path).enhance("t2v", "cat").prompt == expected


# ---------------------------------------------------------------- cache


def test_second_identical_call_is_served_from_cache(server_env: StubServer, tmp_path: Path, video: Path) -> None:
    server_env.push(answer("Recolour the car blue."))
    enhancer = make_enhancer(tmp_path)
    first = enhancer.enhance("v2v", "blue car", videos=[video])
    second = make_enhancer(tmp_path).enhance("v2v", "blue car", videos=[video])
    assert first.status == "enhanced"
    assert second == PEResult("Recolour the car blue.", "blue car", "cached", "test-model", 0)
    assert len(server_env.requests) == 1
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json" and not files[0].name.startswith(".tmp")
    assert json.loads(files[0].read_text())["prompt"] == "Recolour the car blue."


def test_changed_media_bytes_miss_the_cache(server_env: StubServer, tmp_path: Path, png: Path) -> None:
    server_env.push(answer('{"rewritten_text": "first"}'), answer('{"rewritten_text": "second"}'))
    enhancer = make_enhancer(tmp_path)
    assert enhancer.enhance("r2i", "p", images=[png]).status == "enhanced"
    write_image(png, "PNG", (0, 255, 0))  # same path, new content
    assert enhancer.enhance("r2i", "p", images=[png]).status == "enhanced"
    assert len(server_env.requests) == 2


def test_changed_model_or_task_miss_the_cache(server_env: StubServer, tmp_path: Path) -> None:
    server_env.push(answer("a"), answer("b"), answer("c"))
    make_enhancer(tmp_path).enhance("t2v", "p")
    make_enhancer(tmp_path, model="other-model").enhance("t2v", "p")
    make_enhancer(tmp_path).enhance("t2i", "p")
    assert len(server_env.requests) == 3


def test_failures_are_not_cached(server_env: StubServer, tmp_path: Path) -> None:
    server_env.push(empty(), answer("good"))
    enhancer = make_enhancer(tmp_path, max_attempts=1)
    assert enhancer.enhance("t2v", "p").status == "fallback_raw"
    assert enhancer.enhance("t2v", "p").status == "enhanced"


# ---------------------------------------------------------------- retries and failures


def test_slow_answer_times_out_then_falls_back(server_env: StubServer, tmp_path: Path) -> None:
    server_env.push(delayed("too late", 5.0), delayed("too late", 5.0))
    start = time.monotonic()
    result = make_enhancer(tmp_path, timeout_s=0.5, max_attempts=2).enhance("t2v", "slow")
    elapsed = time.monotonic() - start
    assert result.status == "fallback_raw" and result.prompt == "slow" and result.attempts == 2
    assert "Timeout" in (result.error or "")
    assert len(server_env.requests) == 2
    assert elapsed < 3.0


def test_server_error_then_success_is_retried(server_env: StubServer, tmp_path: Path) -> None:
    server_env.push(http_error(500), answer("fine"))
    result = make_enhancer(tmp_path).enhance("t2v", "p")
    assert (result.status, result.prompt, result.attempts, result.error) == ("enhanced", "fine", 2, None)


def test_retries_wait_with_doubling_backoff(server_env: StubServer, tmp_path: Path) -> None:
    server_env.push(http_error(503), http_error(429), answer("third time"))
    start = time.monotonic()
    result = make_enhancer(tmp_path, backoff_s=0.1).enhance("t2v", "p")
    assert (result.status, result.attempts) == ("enhanced", 3)
    assert 0.3 <= time.monotonic() - start < 2.0  # waited 0.1 s, then 0.2 s


def test_auth_error_is_not_retried(server_env: StubServer, tmp_path: Path) -> None:
    server_env.push(http_error(401), answer("never"))
    result = make_enhancer(tmp_path).enhance("t2v", "p")
    assert result.status == "fallback_raw" and result.attempts == 1 and "AuthenticationError" in (result.error or "")
    assert len(server_env.requests) == 1


@pytest.mark.parametrize(
    ("task", "reply", "error"),
    [
        ("t2v", empty(), "empty answer"),
        ("t2v", answer(" \n\t "), "empty answer"),
        ("r2v", malformed_json(), "malformed JSON answer"),
        ("r2v", answer('{"text": "x"}'), "rewritten_text"),
        ("r2v", answer('{"rewritten_text": "  "}'), "rewritten_text"),
        ("r2v", answer('["x"]'), "rewritten_text"),
    ],
)
def test_unusable_answers_fall_back_or_raise(
    server_env: StubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, task: str, reply: Any, error: str
) -> None:
    server_env.push(reply, reply)
    result = make_enhancer(tmp_path, max_attempts=2).enhance(task, "raw prompt")
    assert (result.status, result.prompt, result.attempts) == ("fallback_raw", "raw prompt", 2)
    assert error in (result.error or "")
    assert any(r.levelno == logging.WARNING and "raw prompt" in r.getMessage() for r in caplog.records)
    server_env.push(reply, reply)
    with pytest.raises(PromptEnhancerError, match="failed after 2 attempt"):
        make_enhancer(tmp_path, max_attempts=2, on_error="fail").enhance(task, "raw prompt")
    assert len(server_env.requests) == 4


def test_missing_key_falls_back_without_request(
    stub: StubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BERNINI_PE_BASE_URL", stub.base_url)
    monkeypatch.setenv("BERNINI_PE_API_KEY", "   ")  # blank counts as missing
    result = make_enhancer(tmp_path).enhance("t2v", "p")
    assert (result.status, result.prompt, result.error, result.attempts) == ("fallback_raw", "p", NO_KEY_ERROR, 0)
    with pytest.raises(PromptEnhancerError, match="no API key"):
        make_enhancer(tmp_path, on_error="fail").enhance("t2v", "p")
    assert stub.requests == []


def test_openai_env_fallbacks(stub: StubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-env")
    monkeypatch.setenv("OPENAI_BASE_URL", stub.base_url)
    stub.push(answer("ok"))
    assert make_enhancer(tmp_path).enhance("t2v", "p").status == "enhanced"
    assert only_request(stub).headers["authorization"] == "Bearer sk-openai-env"


def test_empty_prompt_and_unknown_task_are_skipped(
    server_env: StubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    enhancer = make_enhancer(tmp_path, on_error="fail")
    assert enhancer.enhance("t2v", "  ") == PEResult("  ", "  ", "skipped", "test-model", 0)
    result = enhancer.enhance("x2y", "keep me")
    assert (result.status, result.prompt) == ("skipped", "keep me")
    assert any(r.levelno == logging.WARNING and "x2y" in r.getMessage() for r in caplog.records)
    assert server_env.requests == []


# ---------------------------------------------------------------- settings


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="on_error"):
        PESettings(on_error="ignore")
    with pytest.raises(ValueError, match="max_attempts"):
        PESettings(max_attempts=0)
    with pytest.raises(ValueError, match="timeout_s"):
        PESettings(timeout_s=0)
    with pytest.raises(ValueError, match="backoff_s"):
        PESettings(backoff_s=-1)
    assert PESettings(cache_dir="/tmp/x").cache_dir == Path("/tmp/x")  # type: ignore[arg-type]


def test_from_env_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert PESettings.from_env().model == DEFAULT_MODEL
    monkeypatch.setenv("BERNINI_PE_MODEL", "env-model")
    settings = PESettings.from_env(timeout_s=3.0)
    assert (settings.model, settings.timeout_s, settings.cache_dir) == ("env-model", 3.0, tmp_path / "env-cache")
    assert PESettings.from_env("arg-model", cache_dir=None) == PESettings(model="arg-model")
    assert PromptEnhancer(PESettings()).settings.model == "env-model"


@pytest.mark.parametrize(("rotation_ccw", "marker"), [(90.0, (0, 63)), (-90.0, (31, 0))])
def test_video_frames_are_sent_upright(tmp_path: Path, rotation_ccw: float, marker: tuple[int, int]) -> None:
    # Stored 64x32 with a white top-left corner; the display matrix turns it counter-clockwise.
    frames = np.zeros((3, 32, 64, 3), np.uint8)
    frames[:, :8, :8] = 255
    clip = encode_video(tmp_path / "phone.mp4", frames, fps=8, rotation=rotation_ccw)
    messages, _ = build_messages("i2v", "walk", videos=[clip])
    (url,) = [part["image_url"]["url"] for part in messages[1]["content"] if part["type"] == "image_url"]
    sent = Image.open(io.BytesIO(bytes_of(url))).convert("L")
    assert sent.size == (32, 64)
    assert sent.getpixel(marker) > 200 and sent.getpixel((31 - marker[0], 63 - marker[1])) < 50


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_delay(1.0, n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_sidecar_is_json_ready() -> None:
    result = PEResult("new", "old", "enhanced", "m", 1)
    assert json.loads(json.dumps(result.to_sidecar())) == {
        "prompt": "new",
        "original": "old",
        "status": "enhanced",
        "model": "m",
        "attempts": 1,
        "error": None,
        "template_version": templates.TEMPLATE_VERSION,
    }


# ---------------------------------------------------------------- the API key never leaks


def test_api_key_never_leaks(
    stub: StubServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    png: Path,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's and httpx's included
    monkeypatch.setenv("BERNINI_PE_API_KEY", SENTINEL)
    monkeypatch.setenv("BERNINI_PE_BASE_URL", stub.base_url)
    enhancer = make_enhancer(tmp_path, max_attempts=2)
    failing = make_enhancer(tmp_path, max_attempts=2, on_error="fail")
    stub.push(
        answer("A calm lake."),  # success, then cached
        http_error(500, echo_key=True),
        answer('{"rewritten_text": "Generate a video where image0 waves."}'),  # retried success
        http_error(401, echo_key=True),  # fallback, error text from the server names the key
        http_error(503, echo_key=True),
        http_error(503, echo_key=True),  # raise
    )
    results = [
        enhancer.enhance("t2v", "lake"),
        enhancer.enhance("t2v", "lake"),
        enhancer.enhance("r2v", "wave", images=[png]),
        enhancer.enhance("t2i", "fails"),
    ]
    with pytest.raises(PromptEnhancerError) as raised:
        failing.enhance("t2i", "fails too")

    assert [r.status for r in results] == ["enhanced", "cached", "enhanced", "fallback_raw"]
    assert "***" in (results[3].error or "") and "***" in str(raised.value)
    assert [r.headers["authorization"] for r in stub.requests] == [f"Bearer {SENTINEL}"] * 6

    captured = capsys.readouterr()
    texts = [
        captured.out,
        captured.err,
        caplog.text,
        *(r.getMessage() for r in caplog.records),
        repr(enhancer.settings),
        str(enhancer.settings),
        repr(enhancer),
        repr(failing),
        *(repr(r) for r in results),
        *(json.dumps(r.to_sidecar()) for r in results),
        str(raised.value),
        repr(raised.value),
        "".join(traceback.format_exception(raised.value)),
        *(path.read_text() for path in (tmp_path / "cache").rglob("*") if path.is_file()),
    ]
    assert len(caplog.records) > 0
    assert [text for text in texts if SENTINEL in text] == []
