"""What a run may write: our own files versus foreign ones, inputs never overwritten, confinement, run destinations."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bernini.cases import Case


SIDECAR_MARK = ("sidecar_version", "fingerprint")  # keys every sidecar bernini writes holds
SUMMARY_MARK = ("summary_version", "cases")  # and every summary.json
_MAX_JSON_BYTES = 64 * 1024**2  # ours are small; a larger .json is somebody else's


def sidecar_path(output: Path) -> Path:
    """`<output>.json`, next to the output (the same rule as runner.sidecar_path)."""
    return output.with_name(output.name + ".json")


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in a small file, or None (absent, unreadable, too big, not an object)."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_JSON_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marked(path: Path, mark: tuple[str, ...]) -> bool:
    data = read_json_object(path)
    return data is not None and all(key in data for key in mark)


def is_sidecar(path: Path) -> bool:
    return _marked(path, SIDECAR_MARK)


def is_summary(path: Path) -> bool:
    return _marked(path, SUMMARY_MARK)


def written_by_us(output: Path) -> bool:
    """True when `output`'s sidecar is one of ours and names it: such a file is redone or resumed, as always."""
    data = read_json_object(sidecar_path(output))
    if data is None or not all(key in data for key in SIDECAR_MARK):
        return False
    return Path(str(data.get("output", ""))).name == output.name  # by name: the folder may have moved


def is_inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or below it (both resolved, so symlinks cannot leave the folder unnoticed)."""
    return path.resolve().is_relative_to(folder.resolve())


def protected_files(cases: Sequence[Case]) -> dict[Path, str]:
    """Every case file and media file of the batch, with what it is, for the messages."""
    files: dict[Path, str] = {}
    for case in cases:
        if Path(case.source).is_file():
            files.setdefault(Path(case.source), f"the case file {case.source}")
        keyed = [("video", p) for p in case.videos] + ([("image", case.image)] if case.image else []) + [("images", p) for p in case.images]
        for key, path in keyed:
            files.setdefault(path, f"the input {path} ('{key}' of {case.source})")
    return files


class Protected:
    """Files a run must never write: every case's media and case file. Compared by resolved path and inode."""

    def __init__(self, files: Mapping[Path, str]) -> None:
        self.by_path = {Path(p).resolve(): why for p, why in files.items()}
        self.by_inode: dict[tuple[int, int], str] = {}
        for path, why in self.by_path.items():
            try:
                st = path.stat()
            except OSError:
                continue
            self.by_inode.setdefault((st.st_dev, st.st_ino), why)

    def holds(self, path: Path) -> str | None:
        """What `path` is (e.g. "the 'video' of case.json"), or None when it is free to write."""
        resolved = path.resolve()
        if resolved in self.by_path:
            return self.by_path[resolved]
        try:
            st = resolved.stat()
        except OSError:
            return None
        return self.by_inode.get((st.st_dev, st.st_ino))  # a hard link to an input is that input


def output_problem(output: Path, protected: Protected, *, overwrite: bool, confine_to: Path | None) -> str | None:
    """Why `output` (and its sidecar) must not be written, or None. Checked before any model loads."""
    side = sidecar_path(output)
    for target, what in ((output, "the output"), (side, f"its sidecar {side.name}")):
        held = protected.holds(target)
        if held is not None:
            return f"{what} {target} would overwrite {held}; name another output"
    if confine_to is not None and not is_inside(output, confine_to):
        return (
            f"{output} is outside --output_dir {confine_to.resolve()} and --confine_outputs is on; name an output inside "
            f"that folder (relative outputs resolve against the working directory {Path.cwd()})"
        )
    if overwrite:
        return None
    if output.is_file() and not written_by_us(output):
        return (
            f"{output} exists and bernini did not write it (no sidecar {side.name} of ours); pass --overwrite to replace it, "
            "or name another output (or --output_dir)"
        )
    if side.exists() and not is_sidecar(side):
        return f"{side} exists and is not a bernini sidecar; pass --overwrite to replace it, or name another output"
    return None


def _blocking_file(folder: Path) -> Path | None:
    """The first existing ancestor of `folder` (itself included) when it is not a directory."""
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def _writable_folder_problem(folder: Path) -> str | None:
    blocker = _blocking_file(folder)
    if blocker is not None:
        return f"{blocker} is a file, so the folder {folder} cannot be created"
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_destinations(summary: Path, output_dir: Path, protected: Iterable[Path] = (), *, overwrite: bool = False) -> None:
    """--summary and --output_dir are usable before anything loads; ValueError names the flag, the path and the fix.

    `protected`: the batch's inputs, case files, outputs and sidecars, none of which the summary may replace.
    """
    output_dir = Path(output_dir).expanduser().resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder; pass a folder (it is created when missing)")
    problem = _writable_folder_problem(output_dir)
    if problem:
        raise ValueError(f"--output_dir {output_dir}: {problem}; pass another folder")
    summary = Path(summary).expanduser().resolve()
    where = f"the summary {summary} (--summary, default: the outputs' common folder)"
    if summary.is_dir():
        raise ValueError(f"{where} is a folder; pass --summary with a file name, e.g. --summary {summary / 'summary.json'}")
    problem = _writable_folder_problem(summary.parent)
    if problem:
        raise ValueError(f"{where}: {problem}; pass --summary with a path in a writable folder")
    held = Protected({p: str(p) for p in protected}).holds(summary)
    if held is not None:
        raise ValueError(f"{where} would overwrite {held}, a file of this batch; pass another --summary")
    if summary.is_file() and not overwrite and not is_summary(summary):
        raise ValueError(f"{where} exists and is not a bernini summary; pass --overwrite to replace it, or another --summary")
