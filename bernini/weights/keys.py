"""One expert's tensors in a checkpoint: its key prefixes in each layout, EMA copies preferred, its subfolder."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from bernini.weights.errors import CheckpointError, WeightsError
from bernini.weights.locate import (
    TensorRef,
    find_index,
    find_safetensors,
    resolve_model_dir,
)

logger = logging.getLogger(__package__)  # "bernini.weights" in every module, as log lines always read

EMA_PREFIX = "ema."
# Tried in order; the first prefix that matches any key wins. "" means bare diffusers keys.
EXPERT_PREFIXES: dict[str, tuple[str, ...]] = {
    "high": ("diff_dec.transformer.", "transformer.", ""),
    "low": ("diff_dec.transformer_2.", "transformer_2.", ""),
}
# Where each expert lives inside a Diffusers root and a separate-checkpoint root.
EXPERT_SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "high": ("transformer", "bernini_renderer_high"),
    "low": ("transformer_2", "bernini_renderer_low"),
}
# Keys under these namespaces belong to some other component, never to a bare model.
NAMESPACE_PREFIXES: tuple[str, ...] = ("diff_dec.", "transformer.", "transformer_2.")


def select_expert_keys(keys: Iterable[str], expert: str) -> dict[str, str]:
    """Map model keys to file keys for one expert; the first matching prefix wins, ``ema.`` copies preferred."""
    prefixes = expert_prefixes(expert)
    key_list = list(keys)
    for prefix in prefixes:
        plain = strip_prefix(key_list, prefix)
        ema = strip_prefix(key_list, EMA_PREFIX + prefix)
        if not plain and not ema:
            continue
        if ema and plain.keys() - ema.keys():
            logger.warning(
                "%d %s-expert keys under %r have no %r copy; using the non-EMA values for those",
                len(plain.keys() - ema.keys()), expert, prefix, EMA_PREFIX,
            )
        return {**plain, **ema}
    return {}


def expert_prefixes(expert: str) -> tuple[str, ...]:
    """EXPERT_PREFIXES[expert], with a helpful error for a wrong name."""
    if expert not in EXPERT_PREFIXES:
        raise WeightsError(f"unknown expert {expert!r}; use one of {', '.join(sorted(EXPERT_PREFIXES))}")
    return EXPERT_PREFIXES[expert]


def strip_prefix(keys: Iterable[str], prefix: str) -> dict[str, str]:
    """``{key without prefix: key}`` for keys under ``prefix``; the bare prefix skips namespaced keys."""
    selected: dict[str, str] = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        # Without this, "" would capture transformer_2./ema./diff_dec. keys as bare model keys.
        if prefix in ("", EMA_PREFIX) and is_namespaced(rest, bare=prefix == ""):
            continue
        selected[rest] = key
    return selected


def is_namespaced(rest: str, *, bare: bool) -> bool:
    """True if ``rest`` belongs to a component namespace (or is an ``ema.`` copy, for bare keys)."""
    if bare and rest.startswith(EMA_PREFIX):
        return True
    return rest.startswith(NAMESPACE_PREFIXES)


def find_expert_tensors(path_or_id: str | Path, expert: str) -> dict[str, TensorRef]:
    """Locate one expert's weights: ``{model_key: (file, file_key)}`` for any supported layout."""
    expert_prefixes(expert)
    folder = expert_folder(path_or_id, expert)
    files = find_safetensors(folder)
    selected = select_expert_keys(files, expert)
    if not selected:
        examples = ", ".join(sorted(files)[:3])
        other = next(name for name in EXPERT_PREFIXES if name != expert)
        hint = "is this the other expert's folder?"
        if select_expert_keys(files, other):
            hint = f"it holds the {other}-noise expert's keys: --high_noise_ckpt and --low_noise_ckpt look swapped"
        raise CheckpointError(
            f"{folder} holds no {expert}-noise expert weights: expected keys under one of "
            f"{', '.join(repr(p) for p in EXPERT_PREFIXES[expert])} (optionally 'ema.'-prefixed), found e.g. {examples}; {hint}"
        )
    return {model_key: (files[file_key], file_key) for model_key, file_key in selected.items()}


def expert_folder(path_or_id: str | Path, expert: str) -> Path:
    """Descend into ``transformer``/``bernini_renderer_high`` (etc.) when given a repo root."""
    path = Path(path_or_id).expanduser()
    if not path.exists():
        patterns = [f"{name}/*" for name in EXPERT_SUBFOLDERS[expert]] + ["*.json"]
        path = resolve_model_dir(str(path_or_id), allow_patterns=patterns)
    if path.is_file() or find_index(path) is not None or any(path.glob("*.safetensors")):
        return path
    for name in EXPERT_SUBFOLDERS[expert]:
        if (path / name).is_dir():
            return path / name
    return path
