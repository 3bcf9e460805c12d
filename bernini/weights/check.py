"""Checkpoint preflight: what loading would trip over, found from config files and safetensors headers first.

Loading reads the 11 GB text encoder before the experts, so an expert problem used to surface minutes in.
Here every file's header is opened (safetensors refuses a truncated or garbage one), and each expert's
key set, shapes and dtypes are compared with the model its config.json builds, on the meta device.
No tensor is read.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from bernini.weights.errors import MAX_EXAMPLES, CheckpointError, first_line
from bernini.weights.keys import EXPERT_SUBFOLDERS, find_expert_tensors
from bernini.weights.locate import TensorRef, find_safetensors

if TYPE_CHECKING:
    import torch

    from bernini.pipeline import ModelSources

logger = logging.getLogger(__package__)  # "bernini.weights" in every module, as log lines always read

# Storage a floating parameter may have; loading casts it (fp8-scaled community files need their scales).
FLOAT_STORAGE = ("F16", "BF16", "F32", "F64")
FP8_STORAGE = "F8_E4M3"  # the block Linears of `bernini convert --weights fp8` output, beside their scales
# Shared components: (subfolder of the base, its config file, whether it holds safetensors).
SHARED = (("text_encoder", "config.json", True), ("vae", "config.json", True), ("scheduler", "scheduler_config.json", False))

Expected = dict[str, tuple[tuple[int, ...], "torch.dtype"]]


def preflight(sources: ModelSources) -> None:
    """CheckpointError naming the file and the fix for anything Renderer.load would fail on; reads headers only."""
    for folder, config, weighted in SHARED:
        read_config(sources.base / folder / config)
        if weighted:
            find_safetensors(sources.base / folder)  # every shard's header, and what the index claims
    checked = 0
    for expert in sources.renderer.experts:
        checked += check_expert(sources.base, sources.expert_ckpts.get(expert), expert)
    logger.info("checkpoint preflight: %d expert tensors and the shared components' headers are consistent", checked)


def read_config(path: Path) -> dict[str, Any]:
    """A component's config file as a JSON object; CheckpointError names the file otherwise."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the model folder must hold it (re-download the checkpoint)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({first_line(error)}); restore it from the checkpoint's repository") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}; restore it from the checkpoint's repository")
    return data


def expert_key_sources(base: Path, ckpt: str | None, expert: str) -> list[dict[str, TensorRef]]:
    """The key maps loading uses, in its priority order: the separate checkpoint, then the base's expert folder."""
    found = [find_expert_tensors(ckpt, expert)] if ckpt else []
    folder = base / EXPERT_SUBFOLDERS[expert][0]
    if folder.is_dir():
        found.append({key: (file, key) for key, file in find_safetensors(folder).items()})
    if not found:
        raise CheckpointError(f"no weights for the {expert!r} expert: {folder} is missing and no checkpoint was given")
    return found


def expected_tensors(config: Mapping[str, Any], path: Path, fp8_blocks: bool = False) -> Expected:
    """Every state-dict key of the expert `config` describes, with its shape and dtype (built on the meta device);
    ``fp8_blocks``: as `bernini convert --weights fp8` writes it (FP8 block Linears with their scales)."""
    import torch  # lazily, with the model: `import bernini.weights` stays light

    from bernini import convert
    from bernini.models import TransformerConfig, WanTransformer

    try:
        cfg = TransformerConfig.from_dict(dict(config))
        with torch.device("meta"):
            model = WanTransformer(cfg)
        if fp8_blocks:
            convert.fp8_shells(model, "fp8", torch.device("meta"))
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as error:
        raise CheckpointError(f"{path} does not describe a usable Wan2.2 transformer ({first_line(error)}); restore it from the checkpoint's repository") from error
    return {key: (tuple(t.shape), t.dtype) for key, t in model.state_dict().items()}


def check_expert(base: Path, ckpt: str | None, expert: str) -> int:
    """Keys, shapes and dtypes of one expert against its config; returns how many tensors were checked."""
    config_path = base / EXPERT_SUBFOLDERS[expert][0] / "config.json"
    from bernini import convert

    sources = expert_key_sources(base, ckpt, expert)
    expected = expected_tensors(read_config(config_path), config_path, fp8_blocks=convert.holds_fp8(sources))
    where = ckpt or str(base / EXPERT_SUBFOLDERS[expert][0])
    present = {key for source in sources for key in source}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        raise CheckpointError(key_mismatch_message(expert, where, config_path, len(expected), missing, unexpected))
    chosen = {key: next(source[key] for source in sources if key in source) for key in expected}
    check_headers(chosen, expected, config_path)
    return len(chosen)


def key_mismatch_message(expert: str, where: str, config_path: Path, total: int, missing: Sequence[str], unexpected: Sequence[str]) -> str:
    parts = []
    if missing:
        parts.append(f"lacks {len(missing)} of the {total} weights (e.g. {', '.join(missing[:MAX_EXAMPLES])})")
    if unexpected:
        parts.append(f"has {len(unexpected)} keys the model does not use (e.g. {', '.join(unexpected[:MAX_EXAMPLES])})")
    return (
        f"the {expert}-noise expert from {where} {' and '.join(parts)}, against {config_path}; wrong checkpoint or "
        "architecture? Pass the Bernini-R expert matching that config (bare diffusers keys, or ema.diff_dec.transformer(_2).*)"
    )


def check_headers(chosen: Mapping[str, TensorRef], expected: Expected, config_path: Path) -> None:
    """Shape and storage dtype of every chosen tensor, from each file's header (opened once per file)."""
    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for key, (file, file_key) in chosen.items():
        by_file[file].append((key, file_key))
    for file, items in sorted(by_file.items()):
        try:
            with safe_open(str(file), framework="pt") as handle:
                headers = [(key, file_key, handle.get_slice(file_key)) for key, file_key in items]
                headers = [(key, file_key, tuple(part.get_shape()), part.get_dtype()) for key, file_key, part in headers]
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{file} is not a readable safetensors file ({first_line(error)}); re-download it") from error
        for key, file_key, shape, dtype in headers:
            want_shape, want_dtype = expected[key]
            if shape != want_shape:
                raise CheckpointError(
                    f"{file_key} in {file} has shape {list(shape)} but {config_path} makes {key} {list(want_shape)}; "
                    "the config and the weights belong to different models"
                )
            if want_dtype.is_floating_point and dtype not in FLOAT_STORAGE and not (want_dtype.itemsize == 1 and dtype == FP8_STORAGE):
                raise CheckpointError(
                    f"{file_key} in {file} is stored as {dtype}; expert weights must be {'/'.join(FLOAT_STORAGE)} "
                    "(quantized files such as fp8_scaled are not supported: use the bf16/fp32 checkpoint, with --weights fp8 for less memory)"
                )
