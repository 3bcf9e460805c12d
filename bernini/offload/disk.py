"""The experts' blocks on disk: each block's tensors located in their safetensors files and read straight into pinned buffers."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bernini import weights
from bernini.models.transformer import checkpoint_keys
from bernini.offload.host import HostCopy, module_slots, slot_keys

# safetensors' dtype names (https://github.com/huggingface/safetensors, "Format").
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SCALE_SUFFIX = ".weight_scale"  # the per-row scale beside an FP8 weight (bernini.fp8.FP8Linear)


@dataclass(frozen=True)
class Extent:
    """Where one tensor's bytes are: a byte range of a safetensors file."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def safetensors_extents(file: Path) -> dict[str, Extent]:
    """Every tensor's byte range in a safetensors file, from its header alone."""
    return _extents(Path(file), Path(file).stat().st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _extents(file: Path, mtime_ns: int) -> dict[str, Extent]:
    # The format: an 8-byte little-endian header length, a JSON header (dtype, shape, byte range per tensor), the bytes.
    # Read here rather than through safe_open, whose get_tensor copies into a new tensor: we read into the pinned buffer.
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    start = 8 + length
    return {
        key: Extent(file, start + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0], SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))
        for key, info in header.items()
        if key != "__metadata__"
    }


def read_into(file: Path, offset: int, target: torch.Tensor) -> int:
    """Read ``target.numel()`` bytes of ``file`` at ``offset`` into the uint8 CPU tensor ``target`` (no other copy)."""
    view = memoryview(target.numpy()).cast("B")
    done = 0
    with open(file, "rb", buffering=0) as f:
        f.seek(offset)
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise weights.WeightsError(f"{file} ends {len(view) - done} bytes early at offset {offset + done}: truncated? re-download or re-convert it")
            done += n
    return done


Parts = tuple[Extent, ...]  # the tensors one slot's bytes are made of, back to back (one, or the fused QKV's three)


class BlockFiles:
    """One expert's blocks on disk: for each block, where each of its host-copy slots' bytes are, in slot order."""

    def __init__(self, extents: list[list[Parts]]) -> None:
        self.extents = extents

    @property
    def nbytes(self) -> int:
        """Bytes of every block as stored."""
        return sum(e.nbytes for row in self.extents for parts in row for e in parts)

    @classmethod
    def locate(cls, blocks: nn.ModuleList, sources: Sequence[Mapping[str, weights.TensorRef]]) -> BlockFiles:
        """Find every tensor of every block in the priority-ordered key maps; refuse missing keys and wrong shapes.

        A fused tensor (self-attention's to_qkv) is found as the checkpoint's to_q, to_k and to_v: its rows, in order.
        """
        normalized = [weights.normalize_source(source) for source in sources]
        rows = []
        for index, block in enumerate(blocks):
            row = []
            for key, slot in zip(slot_keys(block), module_slots(block), strict=True):
                tensor, full = slot.get(), f"blocks.{index}.{key}"
                parts = []
                for part in checkpoint_keys(full):
                    ref = next((source[part] for source in normalized if part in source), None)
                    if ref is None:
                        raise weights.WeightsError(f"no checkpoint holds {part}; the model config does not match these files")
                    parts.append(safetensors_extents(ref[0])[ref[1]])
                shape = (sum(e.shape[0] for e in parts), *parts[0].shape[1:]) if len(parts) > 1 else parts[0].shape
                if shape != tuple(tensor.shape) or len({e.dtype for e in parts}) != 1:
                    where = ", ".join(f"{list(e.shape)} {e.dtype} in {e.file}" for e in parts)
                    raise weights.WeightsError(f"{full} of the module is {list(tensor.shape)} but the files hold {where}; the config and the weights belong to different models")
                row.append(tuple(parts))
            rows.append(row)
        return cls(rows)

    def read(self, index: int, copy: HostCopy) -> int:
        """Fill ``copy``'s buffer with block ``index`` (bytes as stored; a tensor stored in another dtype is cast). Bytes read."""
        total = 0
        for parts, offset, view in zip(self.extents[index], copy.offsets, copy.host, strict=True):
            nbytes = sum(e.nbytes for e in parts)
            target = copy.buffer[offset : offset + nbytes] if parts[0].dtype == view.dtype else torch.empty(nbytes, dtype=torch.uint8)
            at = 0
            for extent in parts:
                total += read_into(extent.file, extent.offset, target[at : at + extent.nbytes])
                at += extent.nbytes
            if parts[0].dtype != view.dtype:
                view.copy_(target.view(parts[0].dtype).view(view.shape))
        return total


def stored_format(sources: Sequence[Sequence[Mapping[str, object]]]) -> str | None:
    """What the experts' files hold: 'fp8' (written by `bernini convert --weights fp8`), 'bf16' (a checkpoint), None (nothing)."""
    keys = [key for expert in sources for source in expert for key in source]
    if not keys:
        return None
    return "fp8" if any(key.endswith(SCALE_SUFFIX) for key in keys) else "bf16"
