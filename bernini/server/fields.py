"""Request fields -> a case-file object and generation settings, checked with the case-file rules and their messages."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from bernini.cases import CaseError
from bernini.config import GenerationSettings, value_type
from bernini.server.uploads import MEDIA_FIELDS, Body, Upload
from bernini.tasks import TASKS

SOURCE = "request"  # how messages name the request (the CLI names the case file)
OPENAI_KEYS = ("prompt", "model", "size", "seconds", "input_reference")
CASE_KEYS = ("task_type", "guidance_mode", "video", "image", "images")
# The GenerationSettings fields a request may set; each converts to its field's type (int, float or text).
SETTINGS = (
    "seed", "num_frames", "num_inference_steps", "max_image_size", "height", "width",
    "fps", "flow_shift", "omega_vid", "omega_img", "omega_txt", "omega_scale", "eta", "momentum", "neg_prompt",
)  # fmt: skip
ALLOWED = OPENAI_KEYS + CASE_KEYS + SETTINGS
MAX_SECONDS = 600.0
_SIZE = re.compile(r"^\s*(\d{2,5})\s*[xX*]\s*(\d{2,5})\s*$")


@dataclass(frozen=True)
class JobFields:
    """What a request asks for: a case-file object (media as upload paths) and the settings of its render."""

    case: dict[str, Any]
    settings: GenerationSettings
    model: str


def fail(key: str | None, rule: str) -> CaseError:
    """The case-file message shape: '<source>: key '<key>': <rule>'."""
    return CaseError(f"{SOURCE}: key {key!r}: {rule}" if key else f"{SOURCE}: {rule}")


def read_fields(body: Body, base: GenerationSettings, model: str, defaults: Mapping[str, Any] | None = None) -> JobFields:
    """Check a request's fields; CaseError/ValueError name the key and the rule. `defaults`: case keys a remix presets."""
    _check_keys(body)
    values = {key: _one(body, key) for key in body.fields}
    requested = str(values.pop("model", None) or model)
    if requested != model:
        raise fail("model", f"{requested!r} is not served here; this server serves {model!r} (or leave model out)")
    settings = _settings(values, base)
    case: dict[str, Any] = {**(defaults or {})}
    for key in ("task_type", "guidance_mode", "prompt"):
        if key in values:
            case[key] = values[key]
    for key in ("video", "images"):
        if key in body.files:
            case[key] = [str(u.path) for u in body.files[key]]
    if "image" in body.files:
        if len(body.files["image"]) > 1:
            raise fail("image", f"takes one source image, got {len(body.files['image'])} uploads (use 'images' for references)")
        case["image"] = str(body.files["image"][0].path)
    reference = body.files.get("input_reference", [])
    if len(reference) > 1:
        raise fail("input_reference", f"takes one upload, got {len(reference)}")
    if reference:
        _place_reference(case, reference[0])
    elif not any(k in case for k in ("video", "image", "images")):
        case.setdefault("task_type", "t2v")  # a prompt alone makes a video, as /v1/videos promises
    return JobFields(case, settings, model)


def _check_keys(body: Body) -> None:
    for key in [*body.fields, *body.files]:
        if key == "input_reference[file_id]":
            raise fail("input_reference", "file ids are not supported here; upload the file (multipart) or send a base64 data: URL")
        if key == "input_reference[image_url]":
            raise fail("input_reference", "image_url must be a base64 data: URL; web URLs are not fetched, upload the file instead")
        if key not in ALLOWED:
            raise fail(key, f"unknown key; allowed keys: {', '.join(ALLOWED)}")
    for key in MEDIA_FIELDS:
        if key in body.fields:
            raise fail(key, f"send the file as an upload (multipart part {key!r}) or a base64 data: URL; server paths and URLs are not accepted")


def _one(body: Body, key: str) -> Any:
    found = body.fields[key]
    if len(found) != 1:
        raise fail(key, f"given {len(found)} times; give it once")
    return found[0]


def _number(key: str, value: Any, kind: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise fail(key, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    try:
        if kind is int:
            return value if isinstance(value, int) else int(value.strip()) if isinstance(value, str) else _whole(value)
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(value)
        return number
    except (ValueError, OverflowError):
        raise fail(key, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def _whole(value: float) -> int:
    if not value.is_integer():
        raise ValueError(value)
    return int(value)


def _settings(values: dict[str, Any], base: GenerationSettings) -> GenerationSettings:
    changes: dict[str, Any] = {}
    for key in SETTINGS:
        if values.get(key) is None:
            continue
        kind = value_type(GenerationSettings, key)
        if kind is str and not isinstance(values[key], str):
            raise fail(key, f"must be a string, got {values[key]!r}")
        changes[key] = values[key] if kind is str else _number(key, values[key], kind)
    if values.get("size") is not None:
        if "width" in changes or "height" in changes:
            raise fail("size", "give size ('WxH') or width and height, not both")
        match = _SIZE.match(str(values["size"]))
        if not match:
            raise fail("size", f"must be 'WIDTHxHEIGHT' such as '848x480', got {values['size']!r}")
        changes["width"], changes["height"] = int(match[1]), int(match[2])
    if values.get("seconds") is not None:
        if "num_frames" in changes:
            raise fail("seconds", "give seconds or num_frames, not both")
        seconds = _number("seconds", values["seconds"], float)
        if not 0 < seconds <= MAX_SECONDS:
            raise fail("seconds", f"must be more than 0 and at most {MAX_SECONDS:g}, got {seconds:g}")
        fps = changes.get("fps", base.fps)
        changes["num_frames"] = round(seconds * fps) + 1  # the plan coerces it to 4k+1 frames
    return dataclasses.replace(base, **changes)  # GenerationSettings names a value out of range


def is_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # not an image PIL knows: the video probe will say what it is
        return False


def _place_reference(case: dict[str, Any], upload: Upload) -> None:
    """input_reference fills the task's source slot: a video the source video, an image the source image (or first reference)."""
    image = is_image(upload.path)
    case.setdefault("task_type", "i2v" if image else "v2v")  # openai's meaning: the first frame, or the video to edit
    task = TASKS.get(case["task_type"]) if isinstance(case["task_type"], str) else None
    if task is None:
        return  # parse_case names the bad task_type
    slot = ("image" if task.image else "images" if task.images[1] else None) if image else ("video" if task.videos[1] else None)
    if slot is None:
        raise fail("input_reference", f"task {task.name!r} takes no {'image' if image else 'video'} input")
    if slot == "images":  # the first reference; more may come as 'images'
        case["images"] = [str(upload.path), *case.get("images", [])]
    elif slot in case:
        raise fail("input_reference", f"the task's {slot!r} is already given; send the file once, as {slot!r} or as input_reference")
    else:
        case[slot] = str(upload.path) if slot == "image" else [str(upload.path)]
