"""A few pinned buffers that the experts' blocks visit from disk, so host memory holds only what fits (the block plan's 'one' and 'disk')."""

from __future__ import annotations

import math
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from bernini.offload.disk import BlockFiles
from bernini.offload.host import HostCopy, module_slots, packed_layout, pinned_buffer

Key = tuple[str, int]  # (expert, block index)
READ_AHEAD = 2  # blocks: how far ahead a block is read when that costs a block kept for later (reading hides behind two blocks' compute)


class BlockPool:
    """``capacity`` pinned buffers, each able to hold any block of any expert (all blocks share one layout).

    The store asks for a block right before it copies it to the GPU. A reader thread fills buffers ahead of use, in
    the order the denoise loop will ask: the active expert's blocks round and round, then the next expert's once it is
    announced. A read takes a free buffer or one of an idle expert's as far ahead as there are such; it gives up a
    block kept for later only for one needed within READ_AHEAD blocks and sooner (Belady's rule, which with fewer
    buffers than blocks keeps some cached and streams the rest). A buffer is overwritten only after its last copy to
    the GPU has landed. With room for one expert and a few spares, only the switches read from disk.
    """

    def __init__(self, blocks: Mapping[str, nn.ModuleList], files: Mapping[str, BlockFiles], capacity: int, pin: bool) -> None:
        self.blocks = {name: list(b) for name, b in blocks.items()}
        self.files = dict(files)
        self.layers = len(next(iter(self.blocks.values())))
        sizes = {packed_layout([slot.get() for slot in module_slots(block)])[1] for b in self.blocks.values() for block in b}
        if len(sizes) != 1:
            raise ValueError(f"the experts' blocks differ in layout ({sorted(sizes)} bytes): a block pool needs one")
        self.nbytes = sizes.pop()
        if capacity < 2:
            raise ValueError(f"a block pool needs at least 2 buffers (the block in use and the next), got {capacity}")
        self.buffers = [pinned_buffer(self.nbytes, pin, self) for _ in range(capacity)]
        self.holder: list[Key | None] = [None] * capacity
        self.where: dict[Key, int] = {}
        self.copies: dict[Key, HostCopy] = {}
        self.reads: dict[Key, Future[int]] = {}
        self.landed: list[torch.cuda.Event | None] = [None] * capacity  # the last copy out of each buffer
        self.active: str | None = None
        self.position = -1
        self.next: str | None = None
        self.read_bytes = 0
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bernini-blocks")

    @property
    def capacity(self) -> int:
        return len(self.buffers)

    def copy(self, name: str, index: int) -> HostCopy:
        """Block ``index`` of ``name`` in a pinned buffer, read from disk first if it is not there (waits for the read)."""
        key = (name, index)
        if key not in self.where:
            self._schedule(key, self._victim(key, force=True))
        future = self.reads.pop(key, None)
        if future is not None:
            try:
                future.result()
            except BaseException:  # the buffer holds nothing usable: forget it, so a retry reads again
                self.holder[self.where.pop(key)] = None
                self.copies.pop(key, None)
                raise
        return self.copies[key]

    def ready(self, name: str, index: int) -> bool:
        """True when the block is in a buffer with its read done: copying it now will not wait for the disk."""
        key = (name, index)
        return key in self.where and (key not in self.reads or self.reads[key].done())

    def used(self, name: str, index: int, landed: torch.cuda.Event | None) -> None:
        """The store copied this block to the GPU (``landed`` records when that copy is done); read ahead from here."""
        if name != self.active and name == self.next:
            self.next = None  # the announced switch happened
        self.active, self.position = name, index
        self.copied(name, index, landed)
        self.read_ahead()

    def copied(self, name: str, index: int, landed: torch.cuda.Event | None) -> None:
        self.landed[self.where[(name, index)]] = landed

    def activate(self, name: str) -> None:
        """The loop uses ``name`` from now on (a switch, or a case's start): its blocks from 0 are read ahead, the others idle."""
        if name != self.active:
            self.active, self.position, self.next = name, self.layers - 1, None
            self.read_ahead()

    def announce(self, name: str) -> None:
        """The loop switches to ``name`` after this step: read its first blocks into what can be spared."""
        if name != self.active:
            self.next = name
            self.read_ahead()

    def read_ahead(self) -> None:
        for key in self._upcoming():
            if key in self.where:
                continue
            victim = self._victim(key)
            if victim is None:
                break
            self._schedule(key, victim)

    def close(self) -> None:
        self._reader.shutdown(wait=True)

    def _upcoming(self) -> list[Key]:
        """What the loop asks for next, in order: the active expert's blocks round and round, then the announced one's."""
        order = [] if self.active is None else [(self.active, (self.position + k) % self.layers) for k in range(1, self.layers + 1)]
        return order + ([(self.next, j) for j in range(self.layers)] if self.next is not None else [])

    def _distance(self, key: Key) -> float:
        """Blocks until ``key`` is asked for (infinite for an idle expert's)."""
        name, index = key
        if name == self.active:
            return (index - self.position) % self.layers or self.layers
        if name == self.next:  # announced before the active expert's last step: at least one whole forward comes first
            return 2 * self.layers - self.position + index
        return math.inf

    def _victim(self, key: Key, force: bool = False) -> int | None:
        """A buffer for ``key``: a free one or an idle expert's; else, for a block needed within READ_AHEAD, the one
        holding the block needed last if that is later (so a cached block is given up only for one needed sooner);
        ``force``: the block is wanted now."""
        free = next((b for b, held in enumerate(self.holder) if held is None), None)
        if free is not None:
            return free
        taken = [b for b, held in enumerate(self.holder) if held is not None and held not in self.reads]
        if not taken:  # every buffer is being filled: let one finish
            done = next(iter(self.reads))
            self.copy(*done)
            return self._victim(key, force)
        victim = max(taken, key=lambda b: self._distance(self.holder[b]))  # type: ignore[arg-type]
        later = self._distance(self.holder[victim])  # type: ignore[arg-type]
        if force or later == math.inf or (self._distance(key) <= READ_AHEAD and later > self._distance(key)):
            return victim
        return None

    def _schedule(self, key: Key, buffer: int) -> None:
        old = self.holder[buffer]
        if old is not None:
            del self.where[old]
            self.copies.pop(old, None)
        self.holder[buffer], self.where[key] = key, buffer
        data, pinned = self.buffers[buffer]
        copy = HostCopy(module_slots(self.blocks[key[0]][key[1]]), pin=False, buffer=data, pinned=pinned)
        self.copies[key] = copy
        landed, self.landed[buffer] = self.landed[buffer], None
        self.reads[key] = self._reader.submit(self._read, key, copy, landed)

    def _read(self, key: Key, copy: HostCopy, landed: torch.cuda.Event | None) -> int:
        if landed is not None:
            landed.synchronize()  # the GPU still copies the block this buffer held
        nbytes = self.files[key[0]].read(key[1], copy)
        self.read_bytes += nbytes  # only this thread writes it
        return nbytes
