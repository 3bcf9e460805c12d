"""Request bodies (multipart, url-encoded or JSON) streamed into the job's own folder, with a size cap."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from python_multipart.multipart import Field, File, FormParser, parse_options_header

MEDIA_FIELDS = ("input_reference", "video", "image", "images")
MAX_PARTS = 128  # files and fields of one request
MAX_FIELD_BYTES = 1 << 20  # a text field (a prompt): 1 MiB
_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class BodyTooLarge(Exception):
    """The body is over the upload cap (HTTP 413)."""


class BadBody(ValueError):
    """A body that cannot be read: wrong content type, bad JSON, a malformed part (HTTP 400/415)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    path: Path  # under the job's upload folder
    name: str  # the client's file name, made safe


@dataclass
class Body:
    """A request's fields (form values are strings, JSON values keep their types) and its uploaded files, by field."""

    fields: dict[str, list[Any]] = field(default_factory=dict)
    files: dict[str, list[Upload]] = field(default_factory=dict)

    def add_field(self, name: str, value: Any) -> None:
        self.fields.setdefault(name, []).append(value)

    def add_file(self, name: str, upload: Upload) -> None:
        self.files.setdefault(name, []).append(upload)


def field_name(raw: str) -> str:
    """The openai SDK sends lists as `images[]` and objects as `input_reference[image_url]`."""
    return raw.removesuffix("[]")


def safe_name(name: str, index: int) -> str:
    """'<index>-<basename with only [A-Za-z0-9._-]>': no folder parts, no hidden files, unique within the job."""
    base = _SAFE.sub("_", os.path.basename(name.replace("\\", "/"))).lstrip("._")[-80:]
    return f"{index}-{base or 'upload'}"


class _Counter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0

    def add(self, n: int) -> None:
        self.seen += n
        if self.seen > self.limit:
            raise BodyTooLarge(self.limit)


async def read_body(content_type: str, length: str | None, stream: AsyncIterator[bytes], folder: Path, max_bytes: int) -> Body:
    """Read a POST body; files land in `folder` (created here). BodyTooLarge, BadBody."""
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise BodyTooLarge(max_bytes)  # refused before a byte is read
    kind, params = parse_options_header(content_type or "")
    kind_text = kind.decode("latin-1").lower()
    counter = _Counter(max_bytes)
    if kind_text in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _read_form(kind_text, params.get(b"boundary"), stream, folder, counter)
    if kind_text in ("application/json", ""):
        data = bytearray()
        async for chunk in stream:
            counter.add(len(chunk))
            data += chunk
        return json_body(bytes(data), folder)
    raise BadBody(f"content type {kind_text!r} is not accepted; send application/json or multipart/form-data", status=415)


async def _read_form(kind: str, boundary: bytes | None, stream: AsyncIterator[bytes], folder: Path, counter: _Counter) -> Body:
    # Starlette's own form parser spools big uploads to the system temp folder and reads the whole body before
    # a cap could apply; python-multipart's parser, fed here chunk by chunk, writes each file straight into
    # the job's folder and lets the cap stop the upload mid-stream.
    folder.mkdir(parents=True, exist_ok=True)
    body = Body()
    parts = 0
    # python-multipart hands url-encoded fields over still encoded ('+', %XX); multipart fields are raw.
    decode = unquote_plus if kind == "application/x-www-form-urlencoded" else (lambda text: text)

    def on_field(item: Field) -> None:
        nonlocal parts
        parts += 1
        name = field_name(decode((item.field_name or b"").decode("utf-8", "replace")))
        add_value(body, name, decode((item.value or b"").decode("utf-8", "replace")), folder, parts)

    def on_file(item: File) -> None:
        nonlocal parts
        parts += 1
        name = field_name((item.field_name or b"").decode("utf-8", "replace"))
        client_name = (item.file_name or b"").decode("utf-8", "replace")
        target = folder / safe_name(client_name, parts)
        item.file_object.flush()
        if item.in_memory:  # nothing reached the disk: an empty upload
            target.write_bytes(item.file_object.getvalue())  # type: ignore[union-attr]
        else:
            os.replace(item.actual_file_name.decode(), target)  # type: ignore[union-attr]
        item.close()
        body.add_file(name, Upload(target, target.name))

    config = {
        "UPLOAD_DIR": str(folder), "UPLOAD_DELETE_TMP": False, "UPLOAD_KEEP_FILENAME": False, "MAX_MEMORY_FILE_SIZE": 0,
        "MAX_FIELDS": MAX_PARTS, "MAX_FIELD_SIZE": MAX_FIELD_BYTES,
    }
    try:
        parser = FormParser(kind, on_field, on_file, boundary=boundary, config=config)
        async for chunk in stream:
            counter.add(len(chunk))
            parser.write(chunk)
            if parts > MAX_PARTS:
                raise BadBody(f"the request has more than {MAX_PARTS} parts")
        parser.finalize()
    except (BodyTooLarge, BadBody):
        raise
    except Exception as exc:  # a malformed body (python-multipart's errors); the caller redacts server paths
        raise BadBody(f"the multipart body cannot be read ({exc})") from None
    return body


def json_body(data: bytes, folder: Path) -> Body:
    """A JSON object; media fields may hold base64 data: URLs (written to `folder`), never paths or web URLs."""
    try:
        obj = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadBody(f"the body is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BadBody(f"the body must be a JSON object, got {type(obj).__name__}")
    body = Body()
    index = 0
    for name, value in obj.items():
        if name == "input_reference" and isinstance(value, dict):
            items = [(f"input_reference[{key}]", item) for key, item in value.items()]  # the openai shape: {"image_url": ...}
        elif name in MEDIA_FIELDS and isinstance(value, list):
            items = [(name, item) for item in value]
        else:
            items = [(name, value)]
        for key, item in items:
            index += 1
            add_value(body, key, item, folder, index)
    return body


def add_value(body: Body, name: str, value: Any, folder: Path, index: int) -> None:
    """A field value; a data: URL in a media field becomes a file (anything else there, fields.py refuses by rule)."""
    if (name in MEDIA_FIELDS or name == "input_reference[image_url]") and isinstance(value, str) and _DATA_URL.match(value):
        body.add_file("input_reference" if name.startswith("input_reference") else name, write_data_url(value, folder, index))
    else:
        body.add_field(name, value)


def write_data_url(url: str, folder: Path, index: int) -> Upload:
    """A base64 data: URL -> a file in `folder` named by its media type."""
    head, _, payload = url.partition(",")
    subtype = head[5:].split(";")[0].split("/")[-1].lower()
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadBody(f"a data: URL ({head[:40]}...) does not hold valid base64") from None
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / safe_name(f"data.{_SAFE.sub('', subtype) or 'bin'}", index)
    target.write_bytes(raw)
    return Upload(target, target.name)
