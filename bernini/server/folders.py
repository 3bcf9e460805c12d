"""Where the server keeps its files (one folder: the job table, uploads, outputs) and what a response may say about them."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^video_[0-9a-f]{32}$")
PARTIAL = re.compile(r"^\..+\.tmp-\d+")  # the atomic writers' temporary names (media.write_media, write_json_atomic)
THUMBNAIL_SUFFIX = ".jpg"


@dataclass(frozen=True)
class ServerFolders:
    """<root>/jobs.sqlite3, <root>/uploads/<job id>/..., <root>/videos/<job id>.mp4|.png (+ .json sidecar, .jpg thumbnail)."""

    root: Path

    @classmethod
    def create(cls, root: Path) -> ServerFolders:
        folders = cls(Path(root).expanduser().resolve())
        for folder in (folders.root, folders.uploads, folders.videos):
            folder.mkdir(parents=True, exist_ok=True)
        return folders

    @property
    def database(self) -> Path:
        return self.root / "jobs.sqlite3"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def videos(self) -> Path:
        return self.root / "videos"

    def upload_dir(self, job_id: str) -> Path:
        return self.uploads / checked_id(job_id)

    def output(self, job_id: str, suffix: str) -> Path:
        return self.videos / f"{checked_id(job_id)}{suffix}"

    def thumbnail(self, job_id: str) -> Path:
        return self.videos / f"{checked_id(job_id)}{THUMBNAIL_SUFFIX}"

    def inside(self, path: Path) -> Path:
        """`path` resolved, if it lies under the server's folder; ValueError otherwise (never follow a path out)."""
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.root):
            raise ValueError(f"{resolved} is outside the server's folder")
        return resolved

    def relative(self, path: Path) -> str:
        return self.inside(path).relative_to(self.root).as_posix()

    def absolute(self, relative: str) -> Path:
        return self.inside(self.root / relative)

    def outputs_of(self, job_id: str) -> list[Path]:
        """Every file a job's render left (output, sidecar, thumbnail, a killed attempt's temporary files)."""
        stem = checked_id(job_id)
        return [p for p in self.videos.iterdir() if p.name.startswith(stem) or p.name.startswith(f".{stem}")]

    def remove_outputs(self, job_id: str) -> None:
        for path in self.outputs_of(job_id):
            path.unlink(missing_ok=True)

    def remove_job(self, job_id: str) -> None:
        """Outputs and uploads of a deleted job."""
        self.remove_outputs(job_id)
        shutil.rmtree(self.upload_dir(job_id), ignore_errors=True)

    def remove_partials(self) -> int:
        """Temporary files a killed server left behind; never under a final name, never served."""
        found = [p for p in self.videos.iterdir() if PARTIAL.match(p.name)]
        for path in found:
            path.unlink(missing_ok=True)
        return len(found)

    def orphans(self, known: Iterable[str]) -> list[Path]:
        """Upload folders of jobs the table no longer has (a crash between making the folder and queueing)."""
        keep = set(known)
        return [p for p in self.uploads.iterdir() if p.is_dir() and p.name not in keep]


def checked_id(job_id: str) -> str:
    """A job id as the server makes them; anything else (a path, '..') is refused before it reaches the disk."""
    if not JOB_ID.match(job_id):
        raise ValueError(f"{job_id!r} is not a video id (video_ + 32 hex digits)")
    return job_id


class Redactor:
    """Server paths out of text a client sees: an upload shows as its file name, other server folders as <data> / <model>."""

    def __init__(self, folders: ServerFolders, model_dirs: Iterable[Path | str] = ()) -> None:
        uploads = re.escape(str(folders.uploads) + os.sep) + r"video_[0-9a-f]{32}" + re.escape(os.sep)
        named = [(str(folders.root), "<data>"), *((str(Path(d)), "<model>") for d in model_dirs), (str(Path.home()), "~")]
        named = sorted({(p, n) for p, n in named if len(p) > 1}, key=lambda item: -len(item[0]))  # longest first
        self._patterns = [(re.compile(uploads), "")] + [(re.compile(re.escape(p)), n) for p, n in named]

    def __call__(self, text: str) -> str:
        for pattern, name in self._patterns:
            text = pattern.sub(name, text)
        return text
