"""Fill a meta-device module from safetensors tensor by tensor, reporting missing and unused keys."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from bernini.models import WanTransformer
from bernini.weights.errors import MAX_EXAMPLES, WeightsError
from bernini.weights.locate import TensorRef

logger = logging.getLogger(__package__)  # "bernini.weights" in every module, as log lines always read

Source = Mapping[str, Path | str | TensorRef]
Transform = Callable[[str, torch.Tensor], torch.Tensor]  # (model key, tensor as read) -> the tensor to keep


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_weights` put into a module."""

    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    source: str
    loaded_per_source: tuple[int, ...] = ()


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
    keep_fp32: tuple[str, ...] = WanTransformer.keep_fp32,
    strict: bool = True,
    transform: Transform | None = None,
) -> LoadReport:
    """Fill a (meta-device) module from safetensors, tensor by tensor, straight onto ``device``.

    ``sources`` is one mapping or several in priority order (later ones fill keys missing
    from earlier ones); values are a file (file key = model key) or a ``(file, file_key)`` pair.
    Floating tensors are cast to ``dtype`` except those with a name component in ``keep_fp32``
    (by default the model's own list, WanTransformer.keep_fp32);
    ``transform`` (e.g. a LoRA merge) sees each tensor as read, before that cast.
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
    assign_tensors(plan, slots, torch.device(device), dtype, keep_fp32, transform)
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
    transform: Transform | None = None,
) -> None:
    """Read one tensor at a time onto ``device`` and swap it into the module (no second full copy)."""
    for file, items in group_by_file(plan).items():
        logger.debug("reading %d tensors from %s", len(items), file)
        with safe_open(str(file), framework="pt", device=safetensors_device(device)) as handle:
            for key, file_key in items:
                tensor = handle.get_tensor(file_key)
                if transform is not None:
                    tensor = transform(key, tensor)
                put_tensor(slots[key], own_aligned(cast_tensor(tensor, key, dtype, keep_fp32)))


def safetensors_device(device: torch.device) -> str | int:
    """safe_open wants "cpu" or a CUDA index."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return str(device)


def cast_tensor(tensor: torch.Tensor, key: str, dtype: torch.dtype | None, keep_fp32: tuple[str, ...]) -> torch.Tensor:
    """Cast floating tensors to ``dtype``, or float32 for keep_fp32 modules (like diffusers)."""
    if not tensor.is_floating_point() or tensor.element_size() == 1:  # float8: FP8 weights from `bernini convert` stay as stored
        return tensor
    if any(part in keep_fp32 for part in key.split(".")):
        return tensor.to(torch.float32)
    return tensor if dtype is None else tensor.to(dtype)


def own_aligned(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor in memory of its own, 64-byte aligned like every torch allocation.

    On the CPU safetensors hands out views of the mapped file, at whatever offset its header left
    (data_ptr % 64 == 16, 24, ...), and CPU GEMM kernels round differently by operand alignment: the
    same weights would give results ~1e-6 apart depending on the file's layout.
    """
    return tensor.clone() if tensor.device.type == "cpu" and tensor.data_ptr() % 64 else tensor


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
