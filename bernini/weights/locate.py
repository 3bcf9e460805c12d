"""Resolve a path or Hugging Face repo id to a local folder and map every tensor key to its safetensors file."""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError, safe_open

from bernini.weights.errors import MAX_EXAMPLES, CheckpointError, WeightsError, first_line

logger = logging.getLogger(__package__)  # "bernini.weights" in every module, as log lines always read

INDEX_NAMES: tuple[str, ...] = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt")
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")

TensorRef = tuple[Path, str]


def resolve_model_dir(
    path_or_id: str | Path,
    *,
    subfolders: Sequence[str] = (),
    allow_patterns: Sequence[str] | None = None,
) -> Path:
    """Return a local directory for a path or a Hugging Face repo id (cache first, then download)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsError(f"{path_or_id} is a file, not a model directory; pass the folder that contains it")
    text = str(path_or_id)
    if not looks_like_repo_id(text):
        raise WeightsError(f"{text} does not exist; check the path, or pass a Hugging Face repo id like org/name")
    patterns = list(allow_patterns) if allow_patterns is not None else patterns_for(subfolders)
    return fetch_snapshot(text, patterns, subfolders)


def looks_like_repo_id(text: str) -> bool:
    """True for ``org/name``; paths like ``./x``, ``/x``, ``~/x`` or ``a/b/c`` are local."""
    if text.startswith((".", "/", "~", "\\")):
        return False
    return REPO_ID_PATTERN.match(text) is not None


def patterns_for(subfolders: Sequence[str]) -> list[str]:
    """Download patterns: the named subfolders (the whole repo when none) plus the json configs/indexes."""
    if not subfolders:
        return ["*"]
    return [f"{folder.strip('/')}/*" for folder in subfolders] + ["*.json"]


def hub_cache_dir() -> Path | None:
    """The hub cache from the environment *now*; huggingface_hub freezes it at import time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read at call time, for the same reason as :func:`hub_cache_dir`."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def fetch_snapshot(repo_id: str, patterns: Sequence[str], subfolders: Sequence[str]) -> Path:
    """Resolve ``repo_id`` from the local cache, else download it, else raise how to fetch it."""
    cache_dir = hub_cache_dir()
    folder, reason = try_snapshot(repo_id, patterns, subfolders, cache_dir, local_only=True)
    if folder is None and hub_offline():
        reason = f"{reason}; HF_HUB_OFFLINE=1 forbids downloading"
    elif folder is None:
        folder, reason = try_snapshot(repo_id, patterns, subfolders, cache_dir, local_only=False)
    if folder is None:
        raise WeightsError(fetch_instructions(repo_id, cache_dir, reason))
    logger.info("resolved %s to %s", repo_id, folder)
    return folder


def try_snapshot(
    repo_id: str, patterns: Sequence[str], subfolders: Sequence[str], cache_dir: Path | None, *, local_only: bool
) -> tuple[Path | None, str]:
    """One snapshot_download attempt: ``(folder, "")`` if complete, else ``(None, why not)``."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(repo_id, allow_patterns=list(patterns), cache_dir=cache_dir, local_files_only=local_only)
        )
    except (OSError, ValueError) as error:  # hub errors subclass these: offline, not found, no network, bad id
        return None, ("not in the cache" if local_only else f"download failed: {first_line(error)}")
    absent = [name for name in subfolders if not (folder / name).is_dir()]
    if absent:
        return None, f"the snapshot {folder} lacks {', '.join(absent)}"
    return folder, ""


def fetch_instructions(repo_id: str, cache_dir: Path | None, reason: str) -> str:
    """Message for a repo that is neither local nor fetchable."""
    name = repo_id.rsplit("/", 1)[-1]
    where = cache_dir if cache_dir is not None else "the default Hugging Face cache"
    return (
        f"{repo_id} is not a local directory and could not be found in {where} ({reason}). "
        f"Fetch it on a machine with network access with:\n"
        f"    hf download {repo_id} --local-dir {name}\n"
        f"then pass --config {name}"
    )


def find_safetensors(path_or_id: str | Path) -> dict[str, Path]:
    """Map every tensor key to its safetensors file, for an index json, a directory, a file or a hub id."""
    path = Path(path_or_id).expanduser()
    if not path.exists():
        path = resolve_model_dir(str(path_or_id), allow_patterns=["*.safetensors", "*.json"])
    if path.is_file():
        return find_in_file(path)
    return find_in_directory(path)


def find_in_file(path: Path) -> dict[str, Path]:
    """Keys of a single ``.safetensors`` file or of the shards an ``*.index.json`` names."""
    if path.name.endswith(".index.json"):
        return read_index(path)
    if path.suffix == ".safetensors":
        return {key: path for key in read_header_keys(path)}
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(pickle_message(path, [path]))
    raise WeightsError(
        f"{path} is neither a .safetensors file nor a *.safetensors.index.json; pass one of those or their folder"
    )


def find_in_directory(directory: Path) -> dict[str, Path]:
    """Keys of a checkpoint folder: via its index json when present, else by scanning its shards."""
    index = find_index(directory)
    if index is not None:
        return read_index(index)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        error = CheckpointError if any(p.suffix in PICKLE_SUFFIXES for p in directory.iterdir()) else WeightsError
        raise error(empty_directory_message(directory))
    mapping: dict[str, Path] = {}
    for file in files:
        for key in read_header_keys(file):
            if key in mapping:
                raise CheckpointError(
                    f"tensor {key} is in both {mapping[key].name} and {file.name} in {directory} "
                    "(two variants side by side?); pass the one .safetensors file or index json to load"
                )
            mapping[key] = file
    return mapping


def find_index(directory: Path) -> Path | None:
    """The standard index json in ``directory``, else the only ``*.safetensors.index.json``, else None."""
    for name in INDEX_NAMES:
        if (directory / name).is_file():
            return directory / name
    others = sorted(directory.glob("*.safetensors.index.json"))
    if len(others) > 1:
        names = ", ".join(path.name for path in others)
        raise WeightsError(f"{directory} holds several index files ({names}); pass the one to load")
    return others[0] if others else None


def empty_directory_message(directory: Path) -> str:
    """Explain a folder without safetensors: pickles present, or the weights are one level down."""
    pickles = sorted(path for path in directory.iterdir() if path.suffix in PICKLE_SUFFIXES) if directory.is_dir() else []
    if pickles:
        return pickle_message(directory, pickles)
    nested = sorted({path.parent.name for path in directory.glob("*/*.safetensors")})
    if nested:
        return f"{directory} has no .safetensors files itself; its subfolders {', '.join(nested)} do: pass one of those"
    return (
        f"{directory} holds no .safetensors files; "
        "point at the folder with the model weights (or its *.safetensors.index.json)"
    )


PICKLE_ADVICE = (
    "bernini loads only .safetensors, because unpickling can run arbitrary code. Convert a file you trust once with: "
    "python -c \"import torch, safetensors.torch as st; sd = torch.load('IN.bin', map_location='cpu', weights_only=True); "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\""
)


def pickle_message(where: Path, pickles: Sequence[Path]) -> str:
    """Refusal for pickle checkpoints, with the conversion recipe."""
    names = ", ".join(path.name for path in pickles[:MAX_EXAMPLES])
    return f"{where} only has pickle checkpoints ({names}); {PICKLE_ADVICE}"


def read_index(index: Path) -> dict[str, Path]:
    """Parse an index json and check that every shard it names exists and holds its keys."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read the weight_map of {index} ({first_line(error)}); re-download it") from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has an empty or malformed weight_map; re-download it")
    mapping = {key: index.parent / shard for key, shard in weight_map.items()}
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key, file in mapping.items():
        by_file[file].append(key)
    for file, keys in sorted(by_file.items()):
        if not file.is_file():
            raise CheckpointError(f"shard {file.name} named by {index} is missing from {index.parent}; re-download it")
        present = set(read_header_keys(file))
        absent = [key for key in keys if key not in present]
        if absent:
            raise CheckpointError(
                f"{index} says {absent[0]} is in {file.name}, but that file lacks it "
                f"({len(absent)} such keys); the shards and the index disagree: re-download them"
            )
    return mapping


def read_header_keys(file: Path) -> list[str]:
    """Open only the header of a safetensors file; a truncated, corrupt or pickled one raises CheckpointError."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        if looks_like_pickled(file):
            raise CheckpointError(f"{file} is named .safetensors but holds a pickle (torch.save output); {PICKLE_ADVICE}") from error
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({first_line(error)}); "
            "it is probably truncated or corrupt: re-download it"
        ) from error


def looks_like_pickled(file: Path) -> bool:
    """torch.save output: a zip archive (PK) or a raw pickle (protocol byte 0x80)."""
    try:
        with file.open("rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head.startswith((b"PK\x03\x04", b"\x80"))
