"""LoRAs checked against an expert's weight shapes before anything loads, then merged into each weight as it loads."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bernini.lora.files import LoraRef
from bernini.lora.formats import Delta, read_lora
from bernini.weights import MAX_EXAMPLES

log = logging.getLogger("bernini.lora")

Shapes = Mapping[str, tuple[int, ...]]


def model_shapes(config_file: Path) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the expert a transformer config.json describes, with its shape (built on meta)."""
    from bernini.models import TransformerConfig, WanTransformer

    with torch.device("meta"):
        model = WanTransformer(TransformerConfig.from_dict(json.loads(Path(config_file).read_text())))
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@dataclass(frozen=True)
class ExpertLoras:
    """The LoRAs of one expert, checked: each with the weights it changes."""

    expert: str
    refs: tuple[LoraRef, ...]
    keys: tuple[tuple[str, ...], ...]  # per ref, the model keys it changes


def prepare(loras: Sequence[LoraRef], configs: Mapping[str, Path]) -> dict[str, ExpertLoras]:
    """Check every LoRA against its expert (``configs``: expert -> transformer config.json); reads only headers.

    Raises ValueError naming the file when a key matches no weight of the expert, when shapes say another
    architecture, or when the expert does not exist.
    """
    if not loras:
        return {}
    shapes = {name: model_shapes(path) for name, path in configs.items() if any(r.expert == name for r in loras)}
    headers: dict[str, dict[str, Delta]] = {}
    found: dict[str, list[tuple[LoraRef, tuple[str, ...]]]] = {}
    for ref in loras:
        if ref.expert not in configs:
            if any(other.source == ref.source and other.expert in configs for other in loras):
                continue  # --lora on a one-expert model: the expert it has
            raise ValueError(f"LoRA {ref.source} is for the {ref.expert!r} expert, but this model has only {', '.join(configs)}")
        if ref.file not in headers:
            headers[ref.file] = read_lora(Path(ref.file), shapes_only=True)
        found.setdefault(ref.expert, []).append((ref, check(ref, headers[ref.file], shapes[ref.expert])))
    return {name: ExpertLoras(name, tuple(r for r, _ in items), tuple(k for _, k in items)) for name, items in found.items()}


def check(ref: LoraRef, deltas: Mapping[str, Delta], shapes: Shapes) -> tuple[str, ...]:
    """The model keys the LoRA changes; ValueError when any matches no weight or has another shape."""
    if not deltas:
        raise ValueError(f"LoRA {ref.source} holds no LoRA weights")
    unknown = sorted(k for k in deltas if k not in shapes)
    if unknown:
        what = f"all {len(deltas)}" if len(unknown) == len(deltas) else f"{len(unknown)} of the {len(deltas)}"
        raise ValueError(
            f"LoRA {ref.source}: {what} weights it changes match no weight of the {ref.expert} expert (e.g. "
            f"{', '.join(unknown[:MAX_EXAMPLES])}; the expert has e.g. {', '.join(sorted(shapes)[:3])}). "
            "A LoRA for another model (Flux, SD, a Wan I2V or VACE model)?"
        )
    wrong = sorted(k for k, d in deltas.items() if tuple(d.shape) != shapes[k])
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"LoRA {ref.source} is for another architecture: {len(wrong)} of its {len(deltas)} weights have other shapes "
            f"than the {ref.expert} expert's, e.g. {k}: {list(deltas[k].shape)} vs {list(shapes[k])} (a Wan 1.3B or 5B LoRA?)"
        )
    return tuple(sorted(deltas))


class Merger:
    """The loader's per-tensor transform for one expert: ``W + sum(scale * alpha / rank * up @ down)`` plus full deltas.

    In float32 on the tensor's device, as each weight is read and before any dtype cast, FP8 conversion or
    offload packing. Written here because peft merges into its own layer objects, not into tensors as they load.
    """

    def __init__(self, loras: ExpertLoras) -> None:
        self.expert = loras.expert
        self.deltas: dict[str, list[tuple[float, Delta]]] = {}
        read: dict[str, dict[str, Delta]] = {}
        for ref in loras.refs:
            if ref.file not in read:
                read[ref.file] = read_lora(Path(ref.file))
            for key, delta in read[ref.file].items():
                self.deltas.setdefault(key, []).append((ref.scale, delta))
        self.merged: set[str] = set()

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key not in self.deltas:
            return tensor
        merged = tensor.to(torch.float32, copy=True)
        for scale, delta in self.deltas[key]:  # several LoRAs add up, in the order given
            merged += scale * delta.delta(merged.device)
        self.merged.add(key)
        return merged

    def finish(self) -> None:
        """Every weight a LoRA changes went through the loader (an internal invariant)."""
        left = sorted(set(self.deltas) - self.merged)
        if left:
            raise RuntimeError(f"{len(left)} LoRA weights of the {self.expert} expert were never loaded, e.g. {left[0]}")
        log.info("merged %d LoRA weight(s) into the %s expert", len(self.merged), self.expert)


def describe(loras: Mapping[str, ExpertLoras]) -> str:
    """The dry run's lines: per expert, each LoRA with its scale, hash and how many weights it changes."""
    lines = []
    for name, group in loras.items():
        for ref, keys in zip(group.refs, group.keys, strict=True):
            lines.append(f"LoRA {name}: {ref.source} x {ref.scale:g} ({len(keys)} weights, sha256 {ref.sha256[:12]}, {ref.file})")
    return "\n".join(lines)
