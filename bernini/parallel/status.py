"""Agreement inside a model group: status flags at fixed points, so a case fails on all its ranks or none."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

if TYPE_CHECKING:
    from bernini.pipeline import Renderer, RenderOutput

log = logging.getLogger(__name__)

STOP_KEY = "bernini/fail_fast"


class PeerFailure(RuntimeError):
    """Another rank of this model group failed the case; this rank stops the case with it."""


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class GroupStatus:
    """Status flags over the gloo group of one model group (nothing to exchange for a group of one)."""

    def __init__(self, group: dist.ProcessGroup, size: int):
        self.group = group
        self.size = size

    def errors(self, error: str | None) -> list[str | None]:
        """Every rank's error (None: fine) in group order; every rank of the group must call it."""
        if self.size == 1:
            return [error]
        found: list[str | None] = [None] * self.size
        dist.all_gather_object(found, error, group=self.group)
        return found

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank passes True."""
        return any(e is not None for e in self.errors("set" if flag else None))

    @staticmethod
    def first(errors: list[str | None]) -> str | None:
        return next((f"rank {i}: {e}" for i, e in enumerate(errors) if e is not None), None)


class CheckedRender:
    """renderer.render with two checkpoints per case: after preparation and after the render.

    Every rank passes both checkpoints of every case, whatever fails where, so the group's
    collectives stay matched: a rank that failed reports its error, the others raise
    PeerFailure before their next collective instead of waiting for the failed rank.
    """

    def __init__(self, renderer: Renderer, status: GroupStatus, writer: bool):
        self.renderer = renderer
        self.status = status
        self.writer = writer  # helpers return None: BatchRunner then leaves reporting to the writer
        self.passed = 0
        # The Renderer has no hook between preparation and denoising: wrap its last preparation step.
        self._encode_conditions = renderer.encode_conditions
        renderer.encode_conditions = self._encode_then_check  # type: ignore[method-assign]

    def __call__(self, case: Any, settings: Any, **kwargs: Any) -> RenderOutput | None:
        self.passed = 0
        try:
            out = self.renderer.render(case, settings, **kwargs)
        except Exception as exc:
            own = None if isinstance(exc, PeerFailure) else describe(exc)
            while self.passed < 2:
                self._checkpoint(own, strict=False)
            raise
        while self.passed < 2:
            self._checkpoint(None, strict=True)
        return out if self.writer else None

    def _encode_then_check(self, case: Any, settings: Any) -> Any:
        try:
            conditions = self._encode_conditions(case, settings)
        except Exception as exc:
            self._checkpoint(describe(exc), strict=False)
            raise
        self._checkpoint(None, strict=True)
        return conditions

    def _checkpoint(self, error: str | None, strict: bool) -> None:
        """Exchange this rank's error; strict: raise PeerFailure when a peer reported one."""
        self.passed += 1
        failure = GroupStatus.first(self.status.errors(error))
        if strict and failure is not None:
            raise PeerFailure(failure)


class StopFlag:
    """--fail-fast across data-parallel groups: a counter in the rendezvous store, read without a collective."""

    def __init__(self) -> None:
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception as exc:  # a private accessor; without it fail-fast stops only the failing group
            log.warning("--fail-fast stops only the failing model group (no rendezvous store: %s)", exc)
            self.store = None

    def raise_flag(self) -> None:
        if self.store is not None:
            self.store.add(STOP_KEY, 1)

    def is_raised(self) -> bool:
        return self.store is not None and self.store.add(STOP_KEY, 0) > 0
