"""Residency at run time: the ExpertStore the denoiser calls, blocks streamed through it, and loading a model block by block."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bernini import weights
from bernini.models.transformer import WanTransformer
from bernini.offload.disk import BlockFiles
from bernini.offload.host import HostCopy, host_copy, module_slots, slot_keys
from bernini.offload.options import OFFLOADS
from bernini.offload.pool import BlockPool
from bernini.offload.sizes import GiB

log = logging.getLogger("bernini.offload")  # the logger name of the single module this package was split from

BLOCK_FILES = "_block_files"  # where load_lazily leaves an expert's BlockFiles for the store (as host_copy leaves "_host_copy")


class StreamedBlocks(nn.ModuleList):
    """``model.blocks`` whose iteration tells the store before block i is used (same children, same names)."""

    def __init__(self, blocks: nn.ModuleList, before_block: Callable[[int], None]) -> None:
        super().__init__(blocks)
        self._before_block = before_block

    def __iter__(self) -> Iterator[nn.Module]:
        # The forward loop and encode_text both iterate, so this is the one place to fetch and release.
        for index, block in enumerate(super().__iter__()):
            self._before_block(index)
            yield block


class ExpertStore:
    """What the Denoiser asks for an expert: ``store(name)`` returns it usable on the device, per the plan.

    none: every expert resident. expert: the called expert resident, the others in pinned host memory;
    ``prefetch`` copies the next one ahead on a side stream as far as ``prefetch_bytes`` allows, the rest
    is copied at the switch and each block waits only for its own copy. block: non-block parts resident,
    blocks copied in one ahead of use on a side stream and released after; they wait in pinned host memory,
    or, for experts loaded lazily (their blocks left on disk), in a BlockPool of ``host_blocks`` pinned buffers
    that a reader thread fills from the safetensors files ahead of use. Copies are exact: lossless.
    """

    def __init__(
        self, experts: Mapping[str, WanTransformer], offload: str = "none", device: torch.device | str = "cpu", prefetch_bytes: float = 0.0, host_blocks: int = 0
    ) -> None:
        if offload not in OFFLOADS:
            raise ValueError(f"unknown offload {offload!r}; choose one of {', '.join(OFFLOADS)}")
        self.experts = dict(experts)
        self.offload = offload
        self.device = torch.device(device)
        self.prefetch_bytes = prefetch_bytes
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and offload != "none" else None
        self.heads: dict[str, HostCopy | None] = {}
        self.blocks: dict[str, list[HostCopy]] = {}
        self.live: dict[tuple[str, int], HostCopy] = {}  # block plan: the block copies on the device
        self.active: str | None = None
        self.copied_bytes = 0
        self.most_blocks_on_device = 0
        lazy = {name: model.__dict__.get(BLOCK_FILES) for name, model in self.experts.items()}
        if any(lazy.values()) and offload != "block":
            raise ValueError("experts loaded with their blocks left on disk need --offload block")
        self.pool = BlockPool({n: m.blocks for n, m in self.experts.items()}, lazy, host_blocks, self.device.type == "cuda") if any(lazy.values()) else None
        for name, model in self.experts.items():
            if offload != "none":
                self._stage(name, model)

    def _stage(self, name: str, model: WanTransformer) -> None:
        pin = self.device.type == "cuda"
        if self.pool is None:
            self.blocks[name] = [host_copy(block, pin) for block in model.blocks]
        if self.offload == "expert":
            self.heads[name] = host_copy(model, pin, skip="blocks")
        else:
            self.heads[name] = None
            for slot in module_slots(model, skip="blocks"):  # embeddings and head stay resident
                slot.set(slot.get().to(self.device))
        model.blocks = StreamedBlocks(model.blocks, functools.partial(self._before_block, name))

    @property
    def read_bytes(self) -> int:
        """Bytes read back from disk so far (0 unless blocks wait on disk)."""
        return 0 if self.pool is None else self.pool.read_bytes

    def __call__(self, name: str) -> WanTransformer:
        """The expert, usable on the device now (the compute stream waits for what it needs first)."""
        if self.offload != "none":
            for other in self.experts:
                if other != name:
                    self._release_expert(other)
            if self.offload == "expert":
                self._fetch_expert(name)
            if self.pool is not None:
                self.pool.activate(name)  # its blocks are read ahead from here: during text and media encoding at a case's start
        self.active = name
        return self.experts[name]

    def bring_in(self, name: str) -> None:
        """At a case's start: make ``name`` the resident expert and start its copies (no host wait)."""
        self(name)
        self.prefetch(name)

    def prefetch(self, name: str) -> None:
        """Start copying ``name`` ahead of its first step without evicting anything (within the plan's room)."""
        if self.offload == "block":
            if self.pool is not None:
                self.pool.announce(name)
            if self.pool is None or self.pool.ready(name, 0):
                self._fetch_block(name, 0)
        elif self.offload == "expert":
            room = self.prefetch_bytes
            for copy in self._copies(name):
                if not copy.on_device and copy.nbytes > room:
                    break
                self._fetch(copy)
                room -= copy.nbytes

    def _copies(self, name: str) -> list[HostCopy]:
        head = self.heads.get(name)
        return ([head] if head is not None else []) + self.blocks.get(name, [])

    def _fetch_expert(self, name: str) -> None:
        copies = self._copies(name)
        waiting = sum(c.nbytes for c in copies if not c.on_device)
        for copy in copies:
            self._fetch(copy)
        if self.heads[name] is not None:
            self._wait(self.heads[name])  # type: ignore[arg-type]
        if waiting:
            log.debug("expert %s: %.2f GiB copied in now, %.2f GiB were prefetched", name, waiting / GiB, (sum(c.nbytes for c in copies) - waiting) / GiB)

    def _release_expert(self, name: str) -> None:
        for copy in self._copies(name):
            self._release(copy)
        for key in [key for key in self.live if key[0] == name]:
            self._release(self.live.pop(key))

    def _before_block(self, name: str, index: int) -> None:
        if self.offload == "expert":
            self._wait(self.blocks[name][index])
            return
        layers = len(self.experts[name].blocks)
        keep = {index, (index + 1) % layers}
        for key in [key for key in self.live if key[0] == name and key[1] not in keep]:
            self._release(self.live.pop(key))
        copy = self._fetch_block(name, index)
        self._wait(copy)
        nxt = (index + 1) % layers  # overlaps block i's compute; wraps to the next forward
        if self.pool is not None:
            self.pool.used(name, index, copy.landed)
        if self.pool is None or self.pool.ready(name, nxt):  # never wait for the disk here: block i has not been queued yet
            self._fetch_block(name, nxt)
        self.most_blocks_on_device = max(self.most_blocks_on_device, sum(c.on_device for c in self.live.values()))

    def _fetch_block(self, name: str, index: int) -> HostCopy:
        """Block ``index`` of ``name`` on the device (copy started if it was not), from its pinned copy or the pool."""
        copy = self.blocks[name][index] if self.pool is None else self.pool.copy(name, index)
        held = self.live.get((name, index))
        if held is not None and held is not copy:  # the pool gave the block another buffer since
            self._release(held)
        self._fetch(copy)
        self.live[(name, index)] = copy
        if self.pool is not None:
            self.pool.copied(name, index, copy.landed)
        return copy

    def _compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def _fetch(self, copy: HostCopy) -> None:
        if copy.on_device:
            return
        self.copied_bytes += copy.nbytes
        if self.stream is None:
            copy.copy_to(self.device)
            return
        target = torch.empty(copy.nbytes, dtype=torch.uint8, device=self.device)  # on the compute stream's pool
        # The allocator may hand out memory that queued compute still reads: copy only after it.
        self.stream.wait_stream(self._compute_stream())
        with torch.cuda.stream(self.stream):
            target.copy_(copy.buffer, non_blocking=True)
        copy.ready = torch.cuda.Event()
        copy.ready.record(self.stream)
        copy.landed = copy.ready  # kept after the compute stream waited: when the host buffer may be reused
        copy.point_at(target)

    def _wait(self, copy: HostCopy) -> None:
        if copy.ready is not None:
            self._compute_stream().wait_event(copy.ready)
            copy.ready = None

    def _release(self, copy: HostCopy) -> None:
        if copy.on_device:
            self._wait(copy)  # a copy still in flight must land before its memory is reused
            copy.point_at_host()

    def close(self) -> None:
        """Stop the pool's reader thread (nothing else holds resources outside the tensors)."""
        if self.pool is not None:
            self.pool.close()


# --------------------------------------------------------------------------- loading block by block


def _block_sources(sources: Sequence[Mapping[str, Any]], layers: int) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Split priority-ordered key maps into one per block ('blocks.i.' stripped) and the rest."""
    per_block: list[list[dict[str, Any]]] = [[{} for _ in sources] for _ in range(layers)]
    rest: list[dict[str, Any]] = [{} for _ in sources]
    for n, source in enumerate(sources):
        for key, ref in source.items():
            head, _, tail = key.partition(".")
            index, _, name = tail.partition(".")
            if head == "blocks" and index.isdigit() and int(index) < layers:
                per_block[int(index)][n][name] = ref
            else:
                rest[n][key] = ref
    return per_block, rest


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """One INFO line per block would bury the log: only warnings from the loader while blocks load."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def load_blockwise(
    model: WanTransformer,
    sources: Sequence[Mapping[str, Any]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    keep_fp32: tuple[str, ...],
    each_block: Callable[[nn.Module], None],
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Fill a meta-device model one block at a time; ``each_block`` converts or moves a block right after it lands.

    So at most one block's loaded copy exists beside what ``each_block`` keeps (fp8 weights, a pinned host copy).
    ``transform`` (a LoRA merge) sees each tensor as read, by its model key, before ``each_block``.
    """
    per_block, rest = _block_sources(sources, len(model.blocks))
    blocks = model.blocks
    with _quiet(weights.__name__):
        for index, (block, block_sources) in enumerate(zip(blocks, per_block, strict=True)):
            # The block's loader names keys without "blocks.i.".
            local = None if transform is None else (lambda key, tensor, p=f"blocks.{index}.": transform(p + key, tensor))
            weights.load_weights(block, block_sources, device=device, dtype=dtype, keep_fp32=keep_fp32, transform=local)
            each_block(block)
    model.blocks = nn.ModuleList()  # the non-block parts alone, so the loader sees no missing block keys
    try:
        weights.load_weights(model, rest, device=device, dtype=dtype, keep_fp32=keep_fp32, transform=transform)
    finally:
        model.blocks = blocks
    log.info("%s: %d blocks loaded one by one onto %s", type(model).__name__, len(blocks), device)


def load_lazily(
    model: WanTransformer,
    sources: Sequence[Mapping[str, Any]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    keep_fp32: tuple[str, ...],
) -> None:
    """Load a meta-device model's non-block parts onto ``device`` and leave its blocks on disk.

    The blocks' tensors get the dtypes they will have (still on the meta device) and their places in the files;
    the store's BlockPool reads each block into a pinned buffer when it is about to be used.
    """
    files = BlockFiles.locate(model.blocks, sources)
    for index, block in enumerate(model.blocks):
        for key, slot, parts in zip(slot_keys(block), module_slots(block), files.extents[index], strict=True):
            stored = torch.empty(slot.get().shape, dtype=parts[0].dtype, device="meta")
            slot.set(weights.cast_tensor(stored, f"blocks.{index}.{key}", dtype, keep_fp32))
    _, rest = _block_sources(sources, len(model.blocks))
    blocks = model.blocks
    model.blocks = nn.ModuleList()  # the non-block parts alone, so the loader sees no missing block keys
    try:
        weights.load_weights(model, rest, device=device, dtype=dtype, keep_fp32=keep_fp32)
    finally:
        model.blocks = blocks
    model.__dict__[BLOCK_FILES] = files
    log.info("%s: non-block parts loaded onto %s; %d blocks stay on disk until used", type(model).__name__, device, len(blocks))
