"""The prompt cache: one JSON file per sha256 of the task, model, instructions, prompt and media bytes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bernini.prompt_enhancer.messages import _template_for
from bernini.prompt_enhancer.templates import TEMPLATE_VERSION

logger = logging.getLogger(__package__)  # "bernini.prompt_enhancer" in every module, as log lines always read


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
