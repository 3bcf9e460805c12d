"""Packed host copies: a module's tensors in one host buffer (page-locked on CUDA), repointed between host and device copies."""

from __future__ import annotations

import functools
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
            param = self.owner._parameters[self.name]
            if param.is_meta:  # a lazily loaded block's placeholder: .data cannot cross from meta to real memory
                self.owner._parameters[self.name] = nn.Parameter(tensor, requires_grad=False)
            else:
                param.data = tensor  # type: ignore[union-attr]
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


def pinned_buffer(nbytes: int, pin: bool, owner: object) -> tuple[torch.Tensor, bool]:
    """A host byte buffer of ``nbytes``, page-locked when ``pin`` and possible; unpinned when ``owner`` is collected."""
    buffer, pinned = _host_buffer(nbytes, pin)
    if pinned:
        weakref.finalize(owner, _unpin, buffer.data_ptr())
    return buffer, pinned


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


def slot_keys(module: nn.Module, skip: str | None = None) -> list[str]:
    """The state-dict key of each slot of :func:`module_slots`, in the same order."""
    keys: list[str] = []
    for name, sub in module.named_modules():
        if skip and (name == skip or name.startswith(skip + ".")):
            continue
        prefix = f"{name}." if name else ""
        keys += [prefix + n for n, p in sub._parameters.items() if p is not None]
        keys += [prefix + n for n, b in sub._buffers.items() if b is not None]
    return keys


def packed_layout(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Aligned byte offset of each tensor in one packed buffer (a tensor shared by several slots packed once), and the total."""
    offsets, total = [], 0
    first: dict[int, int] = {}
    for t in tensors:
        if id(t) not in first:
            first[id(t)] = total
            total += _align(t.numel() * t.element_size())
        offsets.append(first[id(t)])
    return offsets, total


class HostCopy:
    """A module's tensors packed into one host buffer (page-locked on CUDA); the module points at host or device copies."""

    def __init__(self, slots: list[Slot], pin: bool, buffer: torch.Tensor | None = None, pinned: bool = False) -> None:
        """Pack the slots' tensors into a new buffer, or (``buffer`` given: a pool's) lay them out over it unfilled."""
        tensors = [slot.get() for slot in slots]
        offsets, total = packed_layout(tensors)
        layout = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in tensors]
        self.slots, self.offsets, self.nbytes = slots, offsets, total
        self.device_buffer: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None  # the copy to the device, until the compute stream waits for it
        self.landed: torch.cuda.Event | None = None  # the same, kept: after it the host buffer may be overwritten
        if buffer is not None:  # its bytes come from disk (bernini.offload.disk); the pool owns and pins the buffer
            self.buffer, self.pinned = buffer[:total], pinned
            self.host = _views(self.buffer, offsets, layout)
            self.point_at_host()
            return
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
    pieces: modules the forward runs one after another (a text encoder's embedding, layers, final norm); given, each
    is one chunk, and with ``stream`` set a visit streams them: a piece is copied in when the forward reaches it and
    leaves when it is done, so one piece is on the device at a time. (No side stream: 1024 tokens take a layer about a
    millisecond, its copy about twenty, so there is nothing to overlap.)
    """

    stream = False

    def __init__(self, module: nn.Module, pin: bool, chunk_bytes: int = 2**30, pieces: Sequence[nn.Module] = ()) -> None:
        groups = [(piece, module_slots(piece)) for piece in pieces]
        self.pieces = [piece for piece, slots in groups if slots]
        seen = {id(slot.get()) for _, slots in groups for slot in slots}
        rest = [slot for slot in module_slots(module) if id(slot.get()) not in seen]
        chunks: list[list[Slot]] = [slots for _, slots in groups if slots]
        home: dict[int, int] = {}  # tied tensors go to the chunk that holds their first use
        size = chunk_bytes
        first_rest = len(chunks)
        for slot in rest:
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
        self._piece_copies = self.copies[:first_rest] if self.pieces else []
        self._rest_copies = self.copies[first_rest:] if self.pieces else self.copies
        self.most_on_device = 0

    @property
    def pinned(self) -> bool:
        return all(c.pinned for c in self.copies)

    @property
    def on_device(self) -> bool:
        return any(c.on_device for c in self.copies)

    @contextmanager
    def visit(self, device: torch.device) -> Iterator[None]:
        """The module on ``device`` inside the block (piece by piece when streaming), pointing at its host copy after."""
        hooks = []
        try:
            # Streaming, the first piece comes along: callers read the module's device off its first parameter.
            for copy in self._rest_copies + self._piece_copies[:1] if self.stream else self.copies:
                copy.copy_to(device)
            for index, (piece, copy) in enumerate(zip(self.pieces, self._piece_copies, strict=True) if self.stream else ()):
                hooks.append(piece.register_forward_pre_hook(functools.partial(self._arrive, index, device)))
                hooks.append(piece.register_forward_hook(functools.partial(self._leave, copy)))
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for copy in self.copies:
                copy.point_at_host()

    def _arrive(self, index: int, device: torch.device, *_: object) -> None:
        # Copies and compute share the current stream: a piece's memory is reused only after its last kernel.
        self._piece_copies[index].copy_to(device)
        self.most_on_device = max(self.most_on_device, sum(c.on_device for c in self._piece_copies))

    def _leave(self, copy: HostCopy, *_: object) -> None:
        copy.point_at_host()


def text_pieces(model: nn.Module) -> list[nn.Module]:
    """The pieces a (U)MT5 encoder runs one after another: its token embedding, each layer, its final norm."""
    encoder = getattr(model, "encoder", model)
    return [encoder.embed_tokens, *encoder.block, encoder.final_layer_norm]
