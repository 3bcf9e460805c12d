"""Packed host copies: a module's tensors in one host buffer (page-locked on CUDA), repointed between host and device copies."""

from __future__ import annotations

import logging
import mmap
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("bernini.offload")  # the logger name of the single module this package was split from

ALIGN = 512  # byte alignment of each tensor inside a packed buffer (the CUDA allocator's)
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class Slot:
    """One parameter or buffer of a module, to repoint between host and device copies."""

    owner: nn.Module
    name: str
    is_parameter: bool

    def get(self) -> torch.Tensor:
        return self.owner._parameters[self.name] if self.is_parameter else self.owner._buffers[self.name]  # type: ignore[return-value]

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_parameter:
            self.owner._parameters[self.name].data = tensor  # type: ignore[union-attr]
        else:
            self.owner._buffers[self.name] = tensor


def module_slots(module: nn.Module, skip: str | None = None) -> list[Slot]:
    """Every parameter and buffer of ``module``, leaving out the submodule named ``skip`` (e.g. 'blocks')."""
    slots: list[Slot] = []
    for name, sub in module.named_modules():
        if skip and (name == skip or name.startswith(skip + ".")):
            continue
        slots += [Slot(sub, n, True) for n, p in sub._parameters.items() if p is not None]
        slots += [Slot(sub, n, False) for n, b in sub._buffers.items() if b is not None]
    return slots


def _align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def _views(buffer: torch.Tensor, offsets: Sequence[int], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [buffer[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for o, t in zip(offsets, like, strict=True)]


def _host_buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """A host byte buffer; pinned ones cover whole pages of their own allocation (registering a shared page fails)."""
    if not pin:
        return torch.empty(nbytes, dtype=torch.uint8), False
    size = _align(nbytes, PAGE)
    raw = torch.empty(size + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    pages = raw[start : start + size]
    return pages[:nbytes], _pin(pages)


def _pin(buffer: torch.Tensor) -> bool:
    """Page-lock an existing buffer (cudaHostRegister: no power-of-two rounding, unlike pin_memory())."""
    try:
        cudart = torch.cuda.cudart()
        status = cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    except (RuntimeError, AttributeError) as exc:
        log.warning("cannot pin host memory (%s); copies to the GPU will be slower", exc)
        return False
    if status != cudart.cudaError.success:
        log.warning("cannot pin host memory (%s); copies to the GPU will be slower", cudart.cudaGetErrorString(status))
    return status == cudart.cudaError.success


def _unpin(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


class HostCopy:
    """A module's tensors packed into one host buffer (page-locked on CUDA); the module points at host or device copies."""

    def __init__(self, slots: list[Slot], pin: bool) -> None:
        tensors = [s.get() for s in slots]
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += _align(t.numel() * t.element_size())
        self.slots, self.offsets, self.nbytes = slots, offsets, total
        self.device_buffer: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.buffer, self.pinned = _host_buffer(total, pin)  # pinned before filling: copies from the GPU land at full speed
        if self.pinned:
            weakref.finalize(self, _unpin, self.buffer.data_ptr())
        self.host = _views(self.buffer, offsets, tensors)
        for view, tensor in zip(self.host, tensors, strict=True):
            view.copy_(tensor)
        self.point_at_host()  # the loaded copies (on the GPU or CPU) are freed here

    @property
    def on_device(self) -> bool:
        return self.device_buffer is not None

    def point_at_host(self) -> None:
        for slot, view in zip(self.slots, self.host, strict=True):
            slot.set(view)
        self.device_buffer = None

    def point_at(self, device_buffer: torch.Tensor) -> None:
        for slot, view in zip(self.slots, _views(device_buffer, self.offsets, self.host), strict=True):
            slot.set(view)
        self.device_buffer = device_buffer


def host_copy(module: nn.Module, pin: bool, skip: str | None = None) -> HostCopy:
    """Pack ``module`` (minus ``skip``) into host memory once; later calls return the same copy."""
    existing = module.__dict__.get("_host_copy")
    if existing is not None and skip is None:
        return existing
    copy = HostCopy(module_slots(module, skip), pin)
    if skip is None:
        module.__dict__["_host_copy"] = copy  # the loader packs blocks as they land; the store finds them here
    return copy
