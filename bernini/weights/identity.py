"""A cheap fingerprint of checkpoint files (names, sizes, mtimes, json hash) for output sidecars."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from bernini.weights.errors import WeightsError


def checkpoint_identity(paths: Iterable[str | Path]) -> dict[str, object]:
    """Cheap fingerprint for sidecars: name/size/mtime of each file plus a short sha256 of the json files."""
    files = sorted(identity_files(paths), key=lambda item: item[1])
    json_hash = hashlib.sha256()
    entries = []
    for path, name in files:
        stat = path.stat()
        entries.append({"name": name, "size": stat.st_size, "mtime": stat.st_mtime})
        # Only small json (index/config) files are hashed; 28 GB of shards would take minutes.
        if path.suffix == ".json":
            json_hash.update(name.encode("utf-8") + b"\0" + path.read_bytes())
    return {"files": entries, "json_sha256": json_hash.hexdigest()[:16]}


def identity_files(paths: Iterable[str | Path]) -> set[tuple[Path, str]]:
    """Files to fingerprint with display names: folders' weights/json recursively, files plus sibling json."""
    found: set[tuple[Path, str]] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            for file in path.rglob("*"):
                if file.is_file() and (file.suffix in (".safetensors", ".json")):
                    found.add((file, str(Path(path.name) / file.relative_to(path))))
        elif path.is_file():
            found.add((path, str(Path(path.parent.name) / path.name)))
            for sibling in path.parent.glob("*.json"):
                found.add((sibling, str(Path(path.parent.name) / sibling.name)))
        else:
            raise WeightsError(f"{path} does not exist; cannot fingerprint it for the sidecar")
    return found
