"""Agreement inside a model group: status flags between a case's phases, so a case fails on all its ranks or none."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch.distributed as dist

from bernini.world import describe

if TYPE_CHECKING:
    from bernini.cases import Case
    from bernini.config import GenerationSettings
    from bernini.pipeline import Renderer, RenderOutput
    from bernini.plan import CasePlan
    from bernini.sampling import StepEvent

log = logging.getLogger(__name__)

T = TypeVar("T")
STOP_KEY = "bernini/fail_fast"


class PeerFailure(RuntimeError):
    """Another rank of this model group failed the case; this rank stops the case with it."""


class GroupStatus:
    """Status flags over the gloo group of one model group (nothing to exchange for a group of one)."""

    def __init__(self, group: dist.ProcessGroup, size: int):
        self.group = group
        self.size = size

    def errors(self, error: T | None) -> list[T | None]:
        """Every rank's error (None: fine), or any picklable value, in group order; every rank of the group must call it."""
        if self.size == 1:
            return [error]
        found: list[T | None] = [None] * self.size
        dist.all_gather_object(found, error, group=self.group)
        return found

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank passes True."""
        return any(e is not None for e in self.errors("set" if flag else None))

    def agree(self, value: T | None) -> T | None:
        """The first value of the group's ranks that is not None, on every rank."""
        return next((v for v in self.errors(value) if v is not None), None)

    @staticmethod
    def first(errors: list[str | None]) -> str | None:
        return next((f"rank {i}: {e}" for i, e in enumerate(errors) if e is not None), None)


class GroupRender:
    """Renderer.render on one rank of a model group: the public phases, with the group's agreement between them.

    Every rank reaches each agreement of a case whatever fails where, so the group's collectives stay
    matched: a rank that failed reports its error and raises it, the others raise PeerFailure before
    their next collective instead of waiting for the failed rank. Ranks that do not decode return None.
    """

    def __init__(self, renderer: Renderer, status: GroupStatus):
        self.renderer = renderer
        self.status = status

    def __call__(
        self, case: Case, settings: GenerationSettings, *, plan: CasePlan | None = None, prompt: str | None = None,
        on_step: Callable[[StepEvent], None] | None = None,
    ) -> RenderOutput | None:
        renderer = self.renderer
        prepared = self._agreed(lambda: renderer.prepare(case, settings, plan=plan, prompt=prompt))
        output = self._agreed(lambda: renderer.finish(prepared, renderer.denoise(prepared, on_step)))
        return output if renderer.placement.decodes else None

    def _agreed(self, phase: Callable[[], T]) -> T:
        """Run one phase here, then learn whether every rank of the group got through it."""
        try:
            value = phase()
        except Exception as exc:
            self.status.errors(describe(exc))
            raise
        failure = GroupStatus.first(self.status.errors(None))
        if failure is not None:
            raise PeerFailure(failure)
        return value


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
