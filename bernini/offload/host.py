"""Packed host copies: a module's tensors in one host buffer (page-locked on CUDA), repointed between host and device copies."""

from __future__ import annotations

import logging
import mmap
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
        offsets, layout, total = [], [], 0
        first: dict[int, int] = {}  # a tensor shared by several slots (tied embeddings) is packed once
        for slot in slots:
            t = slot.get()
            if id(t) not in first:
                first[id(t)] = total
                total += _align(t.numel() * t.element_size())
            offsets.append(first[id(t)])
            layout.append(torch.empty(t.shape, dtype=t.dtype, device="meta"))
        self.slots, self.offsets, self.nbytes = slots, offsets, total
        self.device_buffer: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.buffer, self.pinned = _host_buffer(total, pin)  # pinned before filling: copies from the GPU land at full speed
        if self.pinned:
            weakref.finalize(self, _unpin, self.buffer.data_ptr())
        self.host = _views(self.buffer, offsets, layout)
        for slot, view in zip(slots, self.host, strict=True):
            tensor = slot.get()
            if tensor.data_ptr() != view.data_ptr():
                view.copy_(tensor)
            slot.set(view)  # the loaded copy is freed now, not after the whole module: a smaller transient peak

    @property
    def on_device(self) -> bool:
        return self.device_buffer is not None

    def point_at_host(self) -> None:
        for slot, view in zip(self.slots, self.host, strict=True):
            slot.set(view)
        self.device_buffer = None

    def copy_to(self, device: torch.device) -> None:
        """Copy the packed tensors onto ``device`` in one transfer (queued on the current stream) and point the module at them."""
        if not self.on_device:
            target = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
            target.copy_(self.buffer, non_blocking=self.pinned)
            self.point_at(target)

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


class HostModule:
    """A whole module waiting in (pinned) host memory in chunks of about ``chunk_bytes``, copied in for a visit.

    Chunks, not one buffer: after a few cases the allocator's pool is fragmented by activations and streamed
    blocks, and one 10 GiB request can fail where twenty 0.5 GiB ones fit. Leaving costs no copy.
    """

    def __init__(self, module: nn.Module, pin: bool, chunk_bytes: int = 2**30) -> None:
        chunks: list[list[Slot]] = []
        home: dict[int, int] = {}  # tied tensors go to the chunk that holds their first use
        size = chunk_bytes
        for slot in module_slots(module):
            t = slot.get()
            if id(t) in home:
                chunks[home[id(t)]].append(slot)
                continue
            nbytes = t.numel() * t.element_size()
            if size + nbytes > chunk_bytes and size > 0:
                chunks.append([])
                size = 0
            chunks[-1].append(slot)
            home[id(t)] = len(chunks) - 1
            size += nbytes
        self.copies = [HostCopy(c, pin) for c in chunks]

    @property
    def pinned(self) -> bool:
        return all(c.pinned for c in self.copies)

    @property
    def on_device(self) -> bool:
        return any(c.on_device for c in self.copies)

    @contextmanager
    def visit(self, device: torch.device) -> Iterator[None]:
        """The module on ``device`` inside the block, pointing at its host copy again after."""
        try:
            for copy in self.copies:
                copy.copy_to(device)
            yield
        finally:
            for copy in self.copies:
                copy.point_at_host()
