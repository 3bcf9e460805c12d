"""Which LoRA files a run merges: ``FILE[:SCALE]`` specs, local files or hub ids (cache first), and their sha256."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bernini.weights import PICKLE_SUFFIXES, WeightsError, first_line, hub_cache_dir, hub_offline, looks_like_repo_id

log = logging.getLogger("bernini.lora")

# Which experts each flag merges into.
EXPERTS_OF_FLAG: dict[str, tuple[str, ...]] = {"lora": ("high", "low"), "lora_high": ("high",), "lora_low": ("low",)}


@dataclass(frozen=True)
class LoraRef:
    """One LoRA merged into one expert: what was asked, the file read, its hash and the strength."""

    source: str  # as given: a path, or repo[/file.safetensors]
    file: str  # the local .safetensors file read
    sha256: str
    scale: float
    expert: str  # "high" | "low"


def parse_spec(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> (FILE, SCALE); a suffix that is not a number belongs to the file name. Default scale 1."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise ValueError(f"LoRA {text!r}: the scale {tail!r} is not a finite number")
        return head, scale
    return text, 1.0


def locate(source: str) -> Path:
    """A local ``.safetensors`` file for a path or a hub id ``repo[/file.safetensors]`` (the hub cache first)."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise WeightsError(f"LoRA {source} is a folder; pass the .safetensors file inside it")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise WeightsError(f"LoRA {source} is a pickle; bernini reads only .safetensors (unpickling can run code)")
        if path.suffix != ".safetensors":
            raise WeightsError(f"LoRA {source} is not a .safetensors file")
        return path.resolve()
    parts = source.split("/")
    repo = "/".join(parts[:2])
    if len(parts) < 2 or not looks_like_repo_id(repo):
        raise WeightsError(f"LoRA {source} does not exist; pass a .safetensors file or a hub id repo[/file.safetensors]")
    return _hub_file(repo, "/".join(parts[2:]) or None)


def _hub_file(repo: str, filename: str | None) -> Path:
    """The file from the local hub cache, else downloaded (unless HF_HUB_OFFLINE), else how to fetch it."""
    from huggingface_hub import hf_hub_download, snapshot_download

    cache = hub_cache_dir()
    reason = "not in the cache"
    for local_only in (True, False):
        if not local_only and hub_offline():
            reason += "; HF_HUB_OFFLINE=1 forbids downloading"
            break
        try:
            if filename is not None:
                return Path(hf_hub_download(repo, filename, cache_dir=cache, local_files_only=local_only))
            folder = Path(snapshot_download(repo, allow_patterns=["*.safetensors"], cache_dir=cache, local_files_only=local_only))
        except (OSError, ValueError) as error:  # hub errors subclass these: offline, not found, no network
            reason = reason if local_only else f"download failed: {first_line(error)}"
            continue
        files = sorted(folder.rglob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        names = ", ".join(str(f.relative_to(folder)) for f in files[:5]) or "none"
        raise WeightsError(f"LoRA {repo} holds {len(files)} .safetensors files ({names}); name one: {repo}/FILE.safetensors")
    target = f"{repo} {filename}" if filename else repo
    raise WeightsError(f"LoRA {repo}{'/' + filename if filename else ''} is not a local file and could not be found "
                       f"in {cache or 'the default Hugging Face cache'} ({reason}). Fetch it with:\n    hf download {target}")


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def resolve(specs: Sequence[tuple[str, str]]) -> tuple[LoraRef, ...]:
    """(flag, ``FILE[:SCALE]``) pairs, flag in EXPERTS_OF_FLAG -> one LoraRef per expert, in the order given."""
    found: dict[str, tuple[Path, str]] = {}
    refs: list[LoraRef] = []
    for flag, text in specs:
        source, scale = parse_spec(text)
        if source not in found:
            file = locate(source)
            found[source] = (file, sha256_of(file))
        file, digest = found[source]
        refs += [LoraRef(source, str(file), digest, scale, expert) for expert in EXPERTS_OF_FLAG[flag]]
    for ref in refs:
        log.info("LoRA %s (sha256 %s...) x %g into the %s expert", ref.source, ref.sha256[:12], ref.scale, ref.expert)
    return tuple(refs)
