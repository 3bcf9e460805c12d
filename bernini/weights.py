"""Locate Bernini-R / Wan2.2 checkpoints and load their safetensors into meta-device modules."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

# diffusers' WanTransformer3DModel._keep_in_fp32_modules, minus "rope" (it has no stored weights).
DEFAULT_KEEP_FP32: tuple[str, ...] = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
INDEX_NAMES: tuple[str, ...] = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt")
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
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
MAX_EXAMPLES = 5

TensorRef = tuple[Path, str]
Source = Mapping[str, Path | str | TensorRef]


class WeightsError(ValueError):
    """A checkpoint cannot be found or loaded; the message names the path, the problem and the fix."""


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_weights` put into a module."""

    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    source: str
    loaded_per_source: tuple[int, ...] = ()


# --------------------------------------------------------------------------- locating


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


def first_line(error: BaseException) -> str:
    """First line of an exception message, to keep WeightsError messages short."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


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
        raise WeightsError(pickle_message(path, [path]))
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
        raise WeightsError(empty_directory_message(directory))
    mapping: dict[str, Path] = {}
    for file in files:
        for key in read_header_keys(file):
            if key in mapping:
                raise WeightsError(
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


def pickle_message(where: Path, pickles: Sequence[Path]) -> str:
    """Refusal for pickle checkpoints, with the conversion recipe."""
    names = ", ".join(path.name for path in pickles[:MAX_EXAMPLES])
    return (
        f"{where} only has pickle checkpoints ({names}); bernini loads only .safetensors, because unpickling "
        "can run arbitrary code. Convert a file you trust once with: python -c \"import torch, safetensors.torch as st; "
        "sd = torch.load('IN.bin', map_location='cpu', weights_only=True); "
        "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\""
    )


def read_index(index: Path) -> dict[str, Path]:
    """Parse an index json and check that every shard it names exists and holds its keys."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsError(f"cannot read the weight_map of {index} ({first_line(error)}); re-download it") from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index} has an empty or malformed weight_map; re-download it")
    mapping = {key: index.parent / shard for key, shard in weight_map.items()}
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key, file in mapping.items():
        by_file[file].append(key)
    for file, keys in sorted(by_file.items()):
        if not file.is_file():
            raise WeightsError(f"shard {file.name} named by {index} is missing from {index.parent}; re-download it")
        present = set(read_header_keys(file))
        absent = [key for key in keys if key not in present]
        if absent:
            raise WeightsError(
                f"{index} says {absent[0]} is in {file.name}, but that file lacks it "
                f"({len(absent)} such keys); the shards and the index disagree: re-download them"
            )
    return mapping


def read_header_keys(file: Path) -> list[str]:
    """Open only the header of a safetensors file; a truncated or corrupt one raises WeightsError."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise WeightsError(
            f"{file} is not a readable safetensors file ({first_line(error)}); "
            "it is probably truncated or corrupt: re-download it"
        ) from error


# --------------------------------------------------------------------------- expert keys


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
        raise WeightsError(
            f"{folder} holds no {expert}-noise expert weights: expected keys under one of "
            f"{', '.join(repr(p) for p in EXPERT_PREFIXES[expert])} (optionally 'ema.'-prefixed), found e.g. {examples}; "
            "is this the other expert's folder?"
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


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Slot:
    """One state-dict entry of a module: where to put it and what shape it must have."""

    key: str
    owners: tuple[tuple[torch.nn.Module, str], ...]  # several when the tensor is tied
    is_parameter: bool
    requires_grad: bool
    shape: tuple[int, ...]
    dtype: torch.dtype


def load_weights(
    module: torch.nn.Module,
    sources: Source | Sequence[Source],
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = torch.bfloat16,
    keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32,
    strict: bool = True,
) -> LoadReport:
    """Fill a (meta-device) module from safetensors, tensor by tensor, straight onto ``device``.

    ``sources`` is one mapping or several in priority order (later ones fill keys missing
    from earlier ones); values are a file (file key = model key) or a ``(file, file_key)`` pair.
    Floating tensors are cast to ``dtype`` except those with a name component in ``keep_fp32``.
    """
    normalized = [normalize_source(source) for source in as_source_list(sources)]
    description = describe_sources(normalized)
    retie_weights(module)
    slots = collect_slots(module)
    plan, counts = plan_loading(slots, normalized)
    missing = tuple(sorted(key for key in slots if key not in plan and not tied_key_planned(slots[key], plan, slots)))
    unexpected = tuple(sorted({key for source in normalized for key in source if key not in slots}))
    report = LoadReport(len(plan), missing, unexpected, description, tuple(counts))
    log_report(module, report)
    if missing and strict:
        raise WeightsError(missing_message(module, report, len(slots)))
    check_shapes(plan, slots)
    check_unsaved_buffers(module, slots, strict)
    assign_tensors(plan, slots, torch.device(device), dtype, keep_fp32)
    place_unsaved_buffers(module, slots, torch.device(device))
    return report


def as_source_list(sources: Source | Sequence[Source]) -> list[Source]:
    """Accept a single mapping or a priority-ordered sequence of them."""
    if isinstance(sources, Mapping):
        return [sources]
    return list(sources)


def normalize_source(source: Source) -> dict[str, TensorRef]:
    """Turn ``key -> file`` and ``key -> (file, file_key)`` values into ``(Path, file_key)``."""
    normalized: dict[str, TensorRef] = {}
    for key, value in source.items():
        if isinstance(value, tuple):
            normalized[key] = (Path(value[0]), str(value[1]))
        else:
            normalized[key] = (Path(value), key)
    return normalized


def describe_sources(sources: Sequence[Mapping[str, TensorRef]]) -> str:
    """Human summary: the folders each source reads from, fallbacks marked."""
    parts = []
    for number, source in enumerate(sources):
        files = {file for file, _ in source.values()}
        folders = sorted({str(file.parent) for file in files})
        text = f"{', '.join(folders) or '(empty)'} ({len(files)} files)"
        parts.append(text if number == 0 else f"fallback {text}")
    return "; ".join(parts)


def retie_weights(module: torch.nn.Module) -> None:
    """Re-tie shared embeddings: transformers ties them in __init__, but not under init_empty_weights()."""
    tie = getattr(module, "tie_weights", None)
    if callable(tie):
        tie()


def collect_slots(module: torch.nn.Module) -> dict[str, Slot]:
    """Every state-dict key of ``module`` with its owning submodule(s); tied tensors share owners."""
    owners_by_tensor: dict[int, list[tuple[torch.nn.Module, str]]] = defaultdict(list)
    entries: dict[str, tuple[torch.nn.Module, str, torch.Tensor, bool]] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        owner_name, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        is_parameter = attr in owner._parameters
        entries[key] = (owner, attr, tensor, is_parameter)
        owners_by_tensor[id(tensor)].append((owner, attr))
    return {
        key: Slot(
            key=key,
            owners=tuple(owners_by_tensor[id(tensor)]),
            is_parameter=is_parameter,
            requires_grad=bool(tensor.requires_grad),
            shape=tuple(tensor.shape),
            dtype=tensor.dtype,
        )
        for key, (owner, attr, tensor, is_parameter) in entries.items()
    }


def plan_loading(
    slots: Mapping[str, Slot], sources: Sequence[Mapping[str, TensorRef]]
) -> tuple[dict[str, TensorRef], list[int]]:
    """Pick each key from the first source that has it (or a tied alias of it)."""
    plan: dict[str, TensorRef] = {}
    counts = [0] * len(sources)
    done: set[tuple[int, str]] = set()
    for number, source in enumerate(sources):
        for key in slots:
            if key in plan or key not in source:
                continue
            owner_ids = {(id(owner), attr) for owner, attr in slots[key].owners}
            if owner_ids & done:
                continue  # a tied alias was already planned
            plan[key] = source[key]
            done |= owner_ids
            counts[number] += 1
    return plan, counts


def tied_key_planned(slot: Slot, plan: Mapping[str, TensorRef], slots: Mapping[str, Slot]) -> bool:
    """True when another key sharing this slot's tensor is planned."""
    if len(slot.owners) < 2:
        return False
    mine = {(id(owner), attr) for owner, attr in slot.owners}
    return any(mine & {(id(owner), attr) for owner, attr in slots[key].owners} for key in plan)


def log_report(module: torch.nn.Module, report: LoadReport) -> None:
    """INFO for the counts, WARNING for missing/unexpected keys with a few examples."""
    name = type(module).__name__
    logger.info(
        "loading %d tensors into %s from %s (per source: %s)",
        report.loaded, name, report.source, list(report.loaded_per_source),
    )
    if report.missing:
        logger.warning("%s: %d keys missing, e.g. %s", name, len(report.missing), ", ".join(report.missing[:MAX_EXAMPLES]))
    if report.unexpected:
        logger.warning(
            "%s: %d checkpoint keys unused by the module, e.g. %s",
            name, len(report.unexpected), ", ".join(report.unexpected[:MAX_EXAMPLES]),
        )


def missing_message(module: torch.nn.Module, report: LoadReport, total: int) -> str:
    """WeightsError text for missing keys under strict loading."""
    examples = ", ".join(report.missing[:MAX_EXAMPLES])
    return (
        f"{report.source} lacks {len(report.missing)} of the {total} weights {type(module).__name__} needs "
        f"(e.g. {examples}); {len(report.unexpected)} checkpoint keys went unused. Wrong architecture? "
        "Check that the model config matches this checkpoint, add a fallback source (e.g. the Wan2.2 base "
        "transformer folder), or load with strict=False"
    )


def check_shapes(plan: Mapping[str, TensorRef], slots: Mapping[str, Slot]) -> None:
    """Compare file shapes (from headers only) with the module before anything is read."""
    for file, items in group_by_file(plan).items():
        with safe_open(str(file), framework="pt") as handle:
            for key, file_key in items:
                shape = tuple(handle.get_slice(file_key).get_shape())
                if shape != slots[key].shape:
                    raise WeightsError(
                        f"{file_key} in {file} has shape {list(shape)} but the module's {key} is "
                        f"{list(slots[key].shape)}; the model config does not match this checkpoint"
                    )


def group_by_file(plan: Mapping[str, TensorRef]) -> dict[Path, list[tuple[str, str]]]:
    """``{file: [(model_key, file_key), ...]}`` so each shard is opened once."""
    grouped: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for key, (file, file_key) in plan.items():
        grouped[file].append((key, file_key))
    return dict(sorted(grouped.items()))


def assign_tensors(
    plan: Mapping[str, TensorRef],
    slots: Mapping[str, Slot],
    device: torch.device,
    dtype: torch.dtype | None,
    keep_fp32: tuple[str, ...],
) -> None:
    """Read one tensor at a time onto ``device`` and swap it into the module (no second full copy)."""
    for file, items in group_by_file(plan).items():
        logger.debug("reading %d tensors from %s", len(items), file)
        with safe_open(str(file), framework="pt", device=safetensors_device(device)) as handle:
            for key, file_key in items:
                tensor = cast_tensor(handle.get_tensor(file_key), key, dtype, keep_fp32)
                put_tensor(slots[key], tensor)


def safetensors_device(device: torch.device) -> str | int:
    """safe_open wants "cpu" or a CUDA index."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return str(device)


def cast_tensor(tensor: torch.Tensor, key: str, dtype: torch.dtype | None, keep_fp32: tuple[str, ...]) -> torch.Tensor:
    """Cast floating tensors to ``dtype``, or float32 for keep_fp32 modules (like diffusers)."""
    if not tensor.is_floating_point():
        return tensor
    if any(part in keep_fp32 for part in key.split(".")):
        return tensor.to(torch.float32)
    return tensor if dtype is None else tensor.to(dtype)


def put_tensor(slot: Slot, tensor: torch.Tensor) -> None:
    """Install ``tensor`` at every owner of the slot, keeping tied tensors tied."""
    value: torch.Tensor = torch.nn.Parameter(tensor, requires_grad=slot.requires_grad) if slot.is_parameter else tensor
    for owner, attr in slot.owners:
        if slot.is_parameter:
            owner._parameters[attr] = value  # type: ignore[assignment]
        else:
            owner._buffers[attr] = value


def unsaved_buffers(module: torch.nn.Module, slots: Mapping[str, Slot]) -> list[tuple[str, torch.Tensor]]:
    """Non-persistent buffers (e.g. RoPE tables): computed in __init__, never in checkpoints."""
    return [
        (name, buffer)
        for name, buffer in module.named_buffers(remove_duplicate=False)
        if name not in slots and buffer is not None
    ]


def check_unsaved_buffers(module: torch.nn.Module, slots: Mapping[str, Slot], strict: bool) -> None:
    """Refuse (before reading anything) a module whose unsaved buffers were created on meta."""
    stuck = [name for name, buffer in unsaved_buffers(module, slots) if buffer.is_meta]
    if not stuck:
        return
    message = (
        f"{type(module).__name__} has non-persistent buffers on the meta device ({', '.join(stuck[:MAX_EXAMPLES])}); "
        "checkpoints never hold them. Build the module under accelerate.init_empty_weights() "
        "(which keeps buffers real) instead of torch.device('meta')"
    )
    if strict:
        raise WeightsError(message)
    logger.warning(message)


def place_unsaved_buffers(module: torch.nn.Module, slots: Mapping[str, Slot], device: torch.device) -> None:
    """Move the real unsaved buffers to ``device``, keeping their dtype."""
    for name, buffer in unsaved_buffers(module, slots):
        if buffer.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._buffers[attr] = buffer.to(device)


# --------------------------------------------------------------------------- identity


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
