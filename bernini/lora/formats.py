"""A LoRA file in any Wan layout -> per model weight, low-rank factors or a full delta (diffusers' converters do the names)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from bernini.weights import MAX_EXAMPLES, first_line

log = logging.getLogger("bernini.lora")

WAN_PREFIX = "diffusion_model."
MUSUBI_PREFIX = "lora_unet_"
PEFT_PREFIXES = ("transformer.", "base_model.model.")
# Module names only the original Wan layout uses (diffusers says attn1/attn2/ffn.net/proj_out/condition_embedder).
WAN_NAMES = (".self_attn.", ".cross_attn.", ".ffn.0.", ".ffn.2.", "head.head.", "time_embedding.", "text_embedding.", "time_projection.")
FULL_SUFFIXES = {".diff": ".weight", ".diff_b": ".bias"}  # ComfyUI's full-weight deltas
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: a JSON of LoraConfig fields


@dataclass(frozen=True)
class LowRank:
    """``factor * up @ down``: up [out, r, (1...)], down [r, in, (k...)] (conv factors are flattened)."""

    up: torch.Tensor
    down: torch.Tensor
    factor: float  # alpha / rank

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, device: torch.device | str) -> torch.Tensor:
        product = self.up.to(device).flatten(1) @ self.down.to(device).flatten(1)
        return (product * self.factor).reshape(self.shape)


@dataclass(frozen=True)
class Full:
    """A full-weight delta (``.diff`` / ``.diff_b``, or a PEFT ``lora_B.bias``)."""

    value: torch.Tensor
    factor: float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def delta(self, device: torch.device | str) -> torch.Tensor:
        value = self.value.to(device)
        return value if self.factor == 1.0 else value * self.factor


Delta = LowRank | Full


class LoraFormatError(ValueError):
    """A file that is not a LoRA for a Wan DiT; the message names the file, the keys and why."""


def read_lora(path: Path, *, shapes_only: bool = False) -> dict[str, Delta]:
    """Model weight key -> its delta, in float32 (``shapes_only``: meta tensors, only the alphas read)."""
    tensors, metadata = _read(path, shapes_only)
    if not tensors:
        raise LoraFormatError(f"LoRA {path} holds no tensors")
    adapters = [k for k in tensors if "dora_scale" in k or "lora_magnitude_vector" in k]
    if adapters:
        raise LoraFormatError(f"LoRA {path} is a DoRA ({adapters[0]}); merging it needs its magnitude vectors, which bernini does not apply")
    layout = detect_layout(tensors)
    try:
        if layout == "musubi":
            return _from_peft(_musubi_to_peft(tensors), {}, path)
        if layout == "wan":
            return _from_wan(tensors, path)
        return _from_peft(tensors, metadata, path)
    except LoraFormatError:
        raise
    except (KeyError, ValueError, IndexError, RuntimeError) as error:  # diffusers' converters on a foreign layout
        example = next(iter(tensors))
        raise LoraFormatError(
            f"LoRA {path} is not a Wan DiT LoRA in the {layout} layout (keys like {example}): the conversion "
            f"failed ({first_line(error)}); a LoRA for another model (Flux, SD, an I2V model) cannot be merged"
        ) from None


def _read(path: Path, shapes_only: bool) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {}
            for key in handle.keys():
                if shapes_only and not key.endswith(".alpha"):
                    tensors[key] = torch.empty(handle.get_slice(key).get_shape(), dtype=torch.float32, device="meta")
                else:
                    # float32 first: the converters fold alpha into the factors in place.
                    tensors[key] = handle.get_tensor(key).float()
    except (SafetensorError, OSError) as error:
        raise LoraFormatError(f"LoRA {path} is not a readable safetensors file ({first_line(error)})") from None
    raw = metadata.get(METADATA_KEY)
    try:
        return tensors, json.loads(raw) if raw else {}
    except ValueError:
        log.warning("LoRA %s: unreadable %s metadata, ignored", path, METADATA_KEY)
        return tensors, {}


def detect_layout(tensors: Mapping[str, torch.Tensor]) -> str:
    """'musubi' (lora_unet_blocks_N_...), 'wan' (original / ComfyUI names) or 'peft' (diffusers names)."""
    if any(k.startswith(MUSUBI_PREFIX) for k in tensors):
        return "musubi"
    if any(k.startswith(WAN_PREFIX) or any(name in "." + k for name in WAN_NAMES) for k in tensors):
        return "wan"
    return "peft"


def _musubi_to_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.lora_conversion_utils import _convert_musubi_wan_lora_to_diffusers

    return _convert_musubi_wan_lora_to_diffusers(dict(tensors))  # alpha folded into the factors


def _from_wan(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Delta]:
    """Full deltas renamed by diffusers' Wan checkpoint converter, low-rank ones by its Wan LoRA converter.

    The LoRA converter drops ``.diff`` keys (and norm deltas) and maps ``.diff_b`` onto PEFT biases, so the
    full deltas are split off first and renamed like checkpoint weights, which is what they are.
    """
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    bare = {k.removeprefix(WAN_PREFIX): v for k, v in tensors.items()}
    full, low_rank = {}, {}
    for key, value in bare.items():
        suffix = next((s for s in FULL_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            low_rank[WAN_PREFIX + key] = value
            continue
        name = key.removesuffix(suffix)
        # Wan's modulation tables are bare parameters (blocks.N.modulation), not modules with a .weight.
        full[name if name.endswith("modulation") else name + FULL_SUFFIXES[suffix]] = value
    deltas: dict[str, Delta] = {k: Full(v) for k, v in convert_wan_transformer_to_diffusers(full).items()}
    if low_rank:
        for key, delta in _from_peft(_convert_non_diffusers_wan_lora_to_diffusers(low_rank), {}, path).items():
            if key in deltas:
                raise LoraFormatError(f"LoRA {path} changes {key} twice (a full delta and low-rank factors)")
            deltas[key] = delta
    return deltas


def _from_peft(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object], path: Path) -> dict[str, Delta]:
    """``<module>.lora_A.weight`` / ``lora_B.weight`` (+ ``lora_B.bias``, ``<module>.alpha``) -> deltas by model key."""
    prefix = next((p for p in PEFT_PREFIXES if any(k.startswith(p) for k in tensors)), "")
    if prefix == "transformer." and any(k.startswith("transformer_2.") for k in tensors):
        raise LoraFormatError(f"LoRA {path} holds keys of both transformer. and transformer_2.; split it and pass each with --lora_high / --lora_low")
    config = {k.removeprefix("transformer."): v for k, v in metadata.items()}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        rest = key.removeprefix(prefix)
        for part in (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".alpha"):
            if rest.endswith(part):
                modules.setdefault(rest.removesuffix(part), {})[part] = value
                break
        else:
            unknown = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".alpha"))]
            raise LoraFormatError(
                f"LoRA {path} has {len(unknown)} keys that are not LoRA factors, e.g. {', '.join(unknown[:MAX_EXAMPLES])}; "
                "supported: diffusers/PEFT (lora_A/lora_B), Wan/ComfyUI (lora_down/lora_up, .alpha, .diff, .diff_b), musubi (lora_unet_)"
            )
    deltas: dict[str, Delta] = {}
    for module, parts in modules.items():
        down, up = parts.get(".lora_A.weight"), parts.get(".lora_B.weight")
        if down is None or up is None:
            if ".lora_B.bias" in parts and down is None and up is None:
                deltas[module + ".bias"] = Full(parts[".lora_B.bias"])
                continue
            raise LoraFormatError(f"LoRA {path}: {prefix}{module} has only one of lora_A and lora_B")
        factor = _scaling(module, down.shape[0], parts.get(".alpha"), config, path)
        deltas[module + ".weight"] = LowRank(up, down, factor)
        if ".lora_B.bias" in parts:
            deltas[module + ".bias"] = Full(parts[".lora_B.bias"], factor)  # PEFT merges the bias with the same scaling
    return deltas


def _scaling(module: str, rank: int, alpha: torch.Tensor | None, config: Mapping[str, object], path: Path) -> float:
    """alpha / rank: the module's ``.alpha``, else diffusers' LoraConfig metadata, else alpha = rank (scale 1)."""
    if alpha is not None:
        return float(alpha.item()) / rank
    if "lora_alpha" not in config:
        return 1.0  # diffusers/PEFT files without alphas mean W + B @ A
    value = float(config["lora_alpha"])  # type: ignore[arg-type]
    pattern = config.get("alpha_pattern") or {}
    if pattern:
        try:
            from peft.utils.other import get_pattern_key
        except ImportError:
            raise LoraFormatError(f"LoRA {path} gives per-module alphas (alpha_pattern); pip install peft to read them") from None
        key = get_pattern_key(list(pattern), module)  # type: ignore[arg-type]
        value = float(pattern.get(key, value))  # type: ignore[union-attr, arg-type]
    return value / (math.sqrt(rank) if config.get("use_rslora") else rank)
